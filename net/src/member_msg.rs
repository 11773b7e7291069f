//! Membership change messages (`MemberRequest` / `MemberResponse`, `docs/protocol.md`): pure
//! encoders and decoders, no I/O, with the conventions of [`crate::msg`].

use std::time::Duration;

use baton_core::node::{MemberChange, MembershipChanged, MembershipRejection, SubmitError};

use crate::msg::{
    decode_submit_error, encode_submit_error, put_members, put_str, put_str_cut, put_u64,
    read_members, MsgError, Reader, MEMBER_ADDR_BYTES_MAX,
};

/// Longest wait for a new node to catch up a request may ask for (10 minutes).
pub const CATCH_UP_MS_MAX: u64 = baton_core::node::CATCH_UP_MAX.as_millis() as u64;
/// Longest reason string in a `Refused` rejection, in bytes.
pub const REFUSED_REASON_BYTES_MAX: usize = 1024;

const ADD: u8 = 0;
const REMOVE: u8 = 1;
const OK: u8 = 0;
const ERR: u8 = 1;

/// Client → node: a membership change. Only the leader runs it (others answer `NotLeader`),
/// and only for a connection that presented a certificate from the cluster CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRequest {
    /// The request's id.
    pub request_id: u64,
    /// The change.
    pub change: MemberChange,
    /// How long an addition may wait for the new node to catch up (at most
    /// [`CATCH_UP_MS_MAX`]); unused by a removal.
    pub catch_up: Duration,
}

impl MemberRequest {
    /// Appends `[u64 request_id]`, then `[u8 0][u64 id][u32 len][addr][u8 voter][u64
    /// catch_up_ms]` (add) or `[u8 1][u64 id]` (remove).
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        match &self.change {
            MemberChange::Add { id, addr, voter } => {
                out.push(ADD);
                put_u64(out, *id);
                put_str(out, addr);
                out.push(u8::from(*voter));
                put_u64(out, self.catch_up.as_millis().min(u64::MAX as u128) as u64);
            }
            MemberChange::Remove { id } => {
                out.push(REMOVE);
                put_u64(out, *id);
            }
        }
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "member request");
        let request_id = r.u64()?;
        let (change, catch_up) = match r.u8()? {
            ADD => {
                let id = r.u64()?;
                let addr = r.str("member address", MEMBER_ADDR_BYTES_MAX)?.to_owned();
                let voter = r.flag("member voter")?;
                let ms = r.u64()?;
                if ms > CATCH_UP_MS_MAX {
                    return Err(MsgError::TooMany {
                        what: "catch-up wait (ms)",
                        count: ms,
                        max: CATCH_UP_MS_MAX as usize,
                    });
                }
                let change = MemberChange::Add { id, addr, voter };
                (change, Duration::from_millis(ms))
            }
            REMOVE => (MemberChange::Remove { id: r.u64()? }, Duration::ZERO),
            value => {
                return Err(MsgError::BadTag {
                    what: "member change",
                    value,
                })
            }
        };
        r.finish()?;
        Ok(MemberRequest {
            request_id,
            change,
            catch_up,
        })
    }
}

/// Node → client: the membership after the change, or why it was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberResponse {
    /// The request's id.
    pub request_id: u64,
    /// The outcome.
    pub result: Result<MembershipChanged, SubmitError>,
}

impl MemberResponse {
    /// Appends `[u64 request_id]`, then `[u8 0][u64 index][members]` (as in a status response)
    /// or `[u8 1][submit error]`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.request_id);
        match &self.result {
            Ok(c) => {
                out.push(OK);
                put_u64(out, c.index);
                put_members(out, &c.members);
            }
            Err(e) => {
                out.push(ERR);
                encode_submit_error(e, out);
            }
        }
    }

    /// Decodes a body.
    pub fn decode(body: &[u8]) -> Result<Self, MsgError> {
        let mut r = Reader::new(body, "member response");
        let request_id = r.u64()?;
        let result = match r.u8()? {
            OK => {
                let index = r.u64()?;
                let members = read_members(&mut r)?;
                Ok(MembershipChanged { index, members })
            }
            ERR => Err(decode_submit_error(&mut r)?),
            value => {
                return Err(MsgError::BadTag {
                    what: "member result",
                    value,
                })
            }
        };
        r.finish()?;
        Ok(MemberResponse { request_id, result })
    }
}

const UNAUTHENTICATED: u8 = 1;
const BAD_ADDRESS: u8 = 2;
const BAD_ID: u8 = 3;
const ADDRESS_MISMATCH: u8 = 4;
const NOT_A_MEMBER: u8 = 5;
const LAST_VOTER: u8 = 6;
const CATCH_UP_TIMEOUT: u8 = 7;
const IN_PROGRESS: u8 = 8;
const REFUSED: u8 = 9;
const ALREADY_VOTER: u8 = 10;

/// Appends `[u8 code]` and the rejection's fields (strings cut to their bounds).
pub(crate) fn encode_rejection(r: &MembershipRejection, out: &mut Vec<u8>) {
    match r {
        MembershipRejection::Unauthenticated => out.push(UNAUTHENTICATED),
        MembershipRejection::BadAddress { addr } => {
            out.push(BAD_ADDRESS);
            put_str_cut(out, addr, MEMBER_ADDR_BYTES_MAX);
        }
        MembershipRejection::BadId => out.push(BAD_ID),
        MembershipRejection::AddressMismatch { id, addr } => {
            out.push(ADDRESS_MISMATCH);
            put_u64(out, *id);
            put_str_cut(out, addr, MEMBER_ADDR_BYTES_MAX);
        }
        MembershipRejection::AlreadyVoter { id } => {
            out.push(ALREADY_VOTER);
            put_u64(out, *id);
        }
        MembershipRejection::NotAMember { id } => {
            out.push(NOT_A_MEMBER);
            put_u64(out, *id);
        }
        MembershipRejection::LastVoter { id } => {
            out.push(LAST_VOTER);
            put_u64(out, *id);
        }
        MembershipRejection::CatchUpTimeout { id, waited_ms } => {
            out.push(CATCH_UP_TIMEOUT);
            put_u64(out, *id);
            put_u64(out, *waited_ms);
        }
        MembershipRejection::InProgress => out.push(IN_PROGRESS),
        MembershipRejection::Refused { reason } => {
            out.push(REFUSED);
            put_str_cut(out, reason, REFUSED_REASON_BYTES_MAX);
        }
    }
}

/// Reads what [`encode_rejection`] wrote.
pub(crate) fn decode_rejection(r: &mut Reader<'_>) -> Result<MembershipRejection, MsgError> {
    Ok(match r.u8()? {
        UNAUTHENTICATED => MembershipRejection::Unauthenticated,
        BAD_ADDRESS => MembershipRejection::BadAddress {
            addr: r.str("rejected address", MEMBER_ADDR_BYTES_MAX)?.to_owned(),
        },
        BAD_ID => MembershipRejection::BadId,
        ADDRESS_MISMATCH => MembershipRejection::AddressMismatch {
            id: r.u64()?,
            addr: r.str("member address", MEMBER_ADDR_BYTES_MAX)?.to_owned(),
        },
        NOT_A_MEMBER => MembershipRejection::NotAMember { id: r.u64()? },
        ALREADY_VOTER => MembershipRejection::AlreadyVoter { id: r.u64()? },
        LAST_VOTER => MembershipRejection::LastVoter { id: r.u64()? },
        CATCH_UP_TIMEOUT => MembershipRejection::CatchUpTimeout {
            id: r.u64()?,
            waited_ms: r.u64()?,
        },
        IN_PROGRESS => MembershipRejection::InProgress,
        REFUSED => MembershipRejection::Refused {
            reason: r
                .str("refusal reason", REFUSED_REASON_BYTES_MAX)?
                .to_owned(),
        },
        value => {
            return Err(MsgError::BadTag {
                what: "membership rejection",
                value,
            })
        }
    })
}

/// One of each rejection, for round-trip tests.
#[cfg(test)]
pub(crate) fn every_rejection() -> Vec<MembershipRejection> {
    vec![
        MembershipRejection::Unauthenticated,
        MembershipRejection::BadAddress {
            addr: "nowhere".into(),
        },
        MembershipRejection::BadId,
        MembershipRejection::AddressMismatch {
            id: 4,
            addr: "127.0.0.1:7004".into(),
        },
        MembershipRejection::NotAMember { id: 9 },
        MembershipRejection::AlreadyVoter { id: 2 },
        MembershipRejection::LastVoter { id: 1 },
        MembershipRejection::CatchUpTimeout {
            id: 4,
            waited_ms: 60_000,
        },
        MembershipRejection::InProgress,
        MembershipRejection::Refused {
            reason: "learner 7 not found".into(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use baton_core::node::Member;

    use super::*;

    #[test]
    fn requests_and_responses_round_trip() {
        let requests = [
            MemberRequest {
                request_id: 7,
                change: MemberChange::Add {
                    id: 4,
                    addr: "127.0.0.1:7004".into(),
                    voter: true,
                },
                catch_up: Duration::from_secs(60),
            },
            MemberRequest {
                request_id: 8,
                change: MemberChange::Remove { id: 2 },
                catch_up: Duration::ZERO,
            },
        ];
        for req in requests {
            let mut body = Vec::new();
            req.encode(&mut body);
            assert_eq!(MemberRequest::decode(&body), Ok(req));
        }
        let members = vec![
            Member {
                id: 1,
                addr: "127.0.0.1:7001".into(),
                voter: true,
            },
            Member {
                id: 4,
                addr: "[::1]:7004".into(),
                voter: false,
            },
        ];
        let mut results = vec![Ok(MembershipChanged { index: 42, members })];
        results.extend(
            every_rejection()
                .into_iter()
                .map(|r| Err(SubmitError::Membership(r))),
        );
        results.push(Err(SubmitError::NotLeader {
            leader_hint: Some(2),
        }));
        for result in results {
            let resp = MemberResponse {
                request_id: 9,
                result,
            };
            let mut body = Vec::new();
            resp.encode(&mut body);
            assert_eq!(MemberResponse::decode(&body), Ok(resp));
        }
    }

    #[test]
    fn malformed_requests_are_typed_errors() {
        let mut body = Vec::new();
        MemberRequest {
            request_id: 1,
            change: MemberChange::Add {
                id: 4,
                addr: "h:1".into(),
                voter: true,
            },
            catch_up: Duration::from_millis(CATCH_UP_MS_MAX + 1),
        }
        .encode(&mut body);
        assert!(matches!(
            MemberRequest::decode(&body),
            Err(MsgError::TooMany { .. })
        ));
        // An unknown change kind, a truncated body, trailing bytes.
        assert!(matches!(
            MemberRequest::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 9]),
            Err(MsgError::BadTag { .. })
        ));
        let mut body = Vec::new();
        MemberRequest {
            request_id: 1,
            change: MemberChange::Remove { id: 3 },
            catch_up: Duration::ZERO,
        }
        .encode(&mut body);
        assert!(matches!(
            MemberRequest::decode(&body[..body.len() - 1]),
            Err(MsgError::Truncated { .. })
        ));
        body.push(0);
        assert!(matches!(
            MemberRequest::decode(&body),
            Err(MsgError::Trailing { .. })
        ));
    }
}
