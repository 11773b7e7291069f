//! Leadership transfer messages (`LeaderRequest` / `LeaderResponse`, `docs/protocol.md`): pure
//! encoders and decoders, no I/O, with the conventions of [`crate::msg`].

use baton_core::node::{LeaderTransferred, LeadershipRejection, SubmitError};

use crate::msg::{decode_submit_error, encode_submit_error, put_u64, MsgError, Reader};

const ANY: u8 = 0;
const NAMED: u8 = 1;
const OK: u8 = 0;
const ERR: u8 = 1;

/// Client → node: move leadership. Only the leader runs it (others answer `NotLeader`), and
/// only for a connection that presented a certificate from the cluster CA that is not a node's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderRequest {
    /// The request's id.
    pub request_id: u64,
    /// The voter to hand leadership to; `None`: the one whose log matches the leader's furthest.
    pub to: Option<u64>,
}

impl LeaderRequest {
    /// Appends `[u64 request_id]`, then `[u8 0]` (any voter) or `[u8 1][u64 id]`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        match self.to {
            None => out.push(ANY),
            Some(id) => {
                out.push(NAMED);
                put_u64(out, id);
            }
        }
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "leader request");
        let request_id = r.u64()?;
        let to = match r.u8()? {
            ANY => None,
            NAMED => Some(r.u64()?),
            value => {
                return Err(MsgError::BadTag {
                    what: "leader target",
                    value,
                })
            }
        };
        r.finish()?;
        Ok(LeaderRequest { request_id, to })
    }
}

/// Node → client: who leads after the transfer, or why it did not happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderResponse {
    /// The request's id.
    pub request_id: u64,
    /// The outcome.
    pub result: Result<LeaderTransferred, SubmitError>,
}

impl LeaderResponse {
    /// Appends `[u64 request_id]`, then `[u8 0][u64 from][u64 leader][u64 term]` or `[u8
    /// 1][submit error]`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        match &self.result {
            Ok(t) => {
                out.push(OK);
                put_u64(out, t.from);
                put_u64(out, t.leader);
                put_u64(out, t.term);
            }
            Err(e) => {
                out.push(ERR);
                encode_submit_error(e, out);
            }
        }
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "leader response");
        let request_id = r.u64()?;
        let result = match r.u8()? {
            OK => Ok(LeaderTransferred {
                from: r.u64()?,
                leader: r.u64()?,
                term: r.u64()?,
            }),
            ERR => Err(decode_submit_error(&mut r)?),
            value => {
                return Err(MsgError::BadTag {
                    what: "leader result",
                    value,
                })
            }
        };
        r.finish()?;
        Ok(LeaderResponse { request_id, result })
    }
}

const UNAUTHENTICATED: u8 = 1;
const NOT_A_MEMBER: u8 = 2;
const NOT_A_VOTER: u8 = 3;
const UNREACHABLE: u8 = 4;
const NO_CANDIDATE: u8 = 5;
const NOT_TAKEN_OVER: u8 = 6;
const IN_PROGRESS: u8 = 7;
const TAKEN_OVER_BY: u8 = 8;

/// Appends `[u8 code]` and the rejection's fields.
pub(crate) fn encode_rejection(r: &LeadershipRejection, out: &mut Vec<u8>) {
    match r {
        LeadershipRejection::Unauthenticated => out.push(UNAUTHENTICATED),
        LeadershipRejection::NotAMember { id } => {
            out.push(NOT_A_MEMBER);
            put_u64(out, *id);
        }
        LeadershipRejection::NotAVoter { id } => {
            out.push(NOT_A_VOTER);
            put_u64(out, *id);
        }
        LeadershipRejection::Unreachable { id } => {
            out.push(UNREACHABLE);
            put_u64(out, *id);
        }
        LeadershipRejection::NoCandidate => out.push(NO_CANDIDATE),
        LeadershipRejection::NotTakenOver { waited_ms } => {
            out.push(NOT_TAKEN_OVER);
            put_u64(out, *waited_ms);
        }
        LeadershipRejection::InProgress => out.push(IN_PROGRESS),
        LeadershipRejection::TakenOverBy { leader } => {
            out.push(TAKEN_OVER_BY);
            put_u64(out, *leader);
        }
    }
}

/// Reads what [`encode_rejection`] wrote.
pub(crate) fn decode_rejection(r: &mut Reader<'_>) -> Result<LeadershipRejection, MsgError> {
    Ok(match r.u8()? {
        UNAUTHENTICATED => LeadershipRejection::Unauthenticated,
        NOT_A_MEMBER => LeadershipRejection::NotAMember { id: r.u64()? },
        NOT_A_VOTER => LeadershipRejection::NotAVoter { id: r.u64()? },
        UNREACHABLE => LeadershipRejection::Unreachable { id: r.u64()? },
        NO_CANDIDATE => LeadershipRejection::NoCandidate,
        NOT_TAKEN_OVER => LeadershipRejection::NotTakenOver {
            waited_ms: r.u64()?,
        },
        IN_PROGRESS => LeadershipRejection::InProgress,
        TAKEN_OVER_BY => LeadershipRejection::TakenOverBy { leader: r.u64()? },
        value => {
            return Err(MsgError::BadTag {
                what: "leadership rejection",
                value,
            })
        }
    })
}

/// One of each rejection, for round-trip tests.
#[cfg(test)]
pub(crate) fn every_rejection() -> Vec<LeadershipRejection> {
    vec![
        LeadershipRejection::Unauthenticated,
        LeadershipRejection::NotAMember { id: 9 },
        LeadershipRejection::NotAVoter { id: 4 },
        LeadershipRejection::Unreachable { id: 3 },
        LeadershipRejection::NoCandidate,
        LeadershipRejection::NotTakenOver { waited_ms: 1_200 },
        LeadershipRejection::InProgress,
        LeadershipRejection::TakenOverBy { leader: 2 },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip() {
        for to in [None, Some(3), Some(u64::MAX)] {
            let req = LeaderRequest { request_id: 5, to };
            let mut body = Vec::new();
            req.encode(&mut body);
            assert_eq!(LeaderRequest::decode(&body), Ok(req));
        }
        let mut results = vec![Ok(LeaderTransferred {
            from: 1,
            leader: 3,
            term: 7,
        })];
        results.extend(
            every_rejection()
                .into_iter()
                .map(|r| Err(SubmitError::Leadership(r))),
        );
        results.push(Err(SubmitError::NotLeader {
            leader_hint: Some(2),
        }));
        for result in results {
            let resp = LeaderResponse {
                request_id: 9,
                result,
            };
            let mut body = Vec::new();
            resp.encode(&mut body);
            assert_eq!(LeaderResponse::decode(&body), Ok(resp));
        }
    }

    #[test]
    fn malformed_bodies_are_typed_errors() {
        // An unknown target tag, a truncated id, trailing bytes, an unknown rejection code.
        assert!(matches!(
            LeaderRequest::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 7]),
            Err(MsgError::BadTag { .. })
        ));
        let mut body = Vec::new();
        LeaderRequest {
            request_id: 1,
            to: Some(2),
        }
        .encode(&mut body);
        assert!(matches!(
            LeaderRequest::decode(&body[..body.len() - 1]),
            Err(MsgError::Truncated { .. })
        ));
        body.push(0);
        assert!(matches!(
            LeaderRequest::decode(&body),
            Err(MsgError::Trailing { .. })
        ));
        let mut body = Vec::new();
        LeaderResponse {
            request_id: 1,
            result: Err(SubmitError::Leadership(LeadershipRejection::NoCandidate)),
        }
        .encode(&mut body);
        *body.last_mut().unwrap() = 99;
        assert!(matches!(
            LeaderResponse::decode(&body),
            Err(MsgError::BadTag { .. })
        ));
    }
}
