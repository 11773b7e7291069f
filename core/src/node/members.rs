//! Membership changes, run on the leader's Raft shard: a node is added as a learner, brought up
//! to date, then made a voter (openraft's joint consensus); a node is removed in one change.
//!
//! Each step is bounded: the membership entry must commit within the node's commit wait
//! (`CommitTimeout`, outcome unknown, asking again is safe), and a new node must catch up within
//! the caller's wait (`CatchUpTimeout`, it stays a learner). Asking again for a change that is
//! already in place answers at once with the membership as it is.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};

use super::blocks::tokio_free_timeout;
use super::engine::{status_of, wait_for, Raft};
use super::handle::{Member, MemberChange, MembershipChanged, NodeStatus};
use crate::node::error::{MembershipRejection, SubmitError};
use crate::raft::TypeConfig;

/// Runs `change` on this node, which must be the leader.
pub(crate) async fn change_members(
    raft: &Raft,
    change: MemberChange,
    catch_up: Duration,
    commit_wait: Duration,
) -> Result<MembershipChanged, SubmitError> {
    let status = status_of(raft);
    if !raft.is_leader() {
        return Err(SubmitError::NotLeader {
            leader_hint: status.leader,
        });
    }
    let refuse = |r| Err(SubmitError::Membership(r));
    match change {
        MemberChange::Add { id, addr, voter } => {
            if id == 0 {
                return refuse(MembershipRejection::BadId);
            }
            if !is_host_port(&addr) {
                return refuse(MembershipRejection::BadAddress { addr });
            }
            match status.members.iter().find(|m| m.id == id) {
                Some(m) if m.addr != addr => {
                    return refuse(MembershipRejection::AddressMismatch {
                        id,
                        addr: m.addr.clone(),
                    })
                }
                Some(m) if m.voter || !voter => return Ok(unchanged(status)),
                // A learner at that address, to be promoted: it must be caught up first.
                Some(_) => {}
                None => {
                    let node = BasicNode { addr };
                    bounded(raft.add_learner(id, node, false), commit_wait).await?;
                }
            }
            wait_caught_up(raft, id, catch_up).await?;
            if !voter {
                return Ok(current(raft, None));
            }
            let add = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
            let written = bounded(raft.change_membership(add, false), commit_wait).await?;
            Ok(current(raft, Some(written)))
        }
        MemberChange::Remove { id } => {
            let Some(member) = status.members.iter().find(|m| m.id == id) else {
                return refuse(MembershipRejection::NotAMember { id });
            };
            let change = if member.voter {
                if status.members.iter().filter(|m| m.voter).count() == 1 {
                    return refuse(MembershipRejection::LastVoter { id });
                }
                ChangeMembers::RemoveVoters(BTreeSet::from([id]))
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([id]))
            };
            // `retain = false`: a removed voter leaves the membership instead of staying on as a
            // learner.
            let written = bounded(raft.change_membership(change, false), commit_wait).await?;
            Ok(current(raft, Some(written)))
        }
    }
}

/// `host:port` with a non-empty host and a port in 1..=65535 (the host is resolved when
/// dialing, as for the configured peers).
fn is_host_port(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.chars().any(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    }
}

fn unchanged(status: NodeStatus) -> MembershipChanged {
    MembershipChanged {
        index: 0,
        members: status.members,
    }
}

/// The membership after a change: the written entry's, else the leader's current one.
fn current(raft: &Raft, written: Option<Written>) -> MembershipChanged {
    let Some((index, Some(membership))) = written else {
        let status = status_of(raft);
        let index = written.map_or(0, |(i, _)| i);
        return MembershipChanged {
            index,
            members: status.members,
        };
    };
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, node)| Member {
            id: *id,
            addr: node.addr.clone(),
            voter: voters.contains(id),
        })
        .collect();
    MembershipChanged { index, members }
}

type Membership = openraft::Membership<u64, BasicNode>;
type Written = (u64, Option<Membership>);
type WriteResponse = openraft::raft::ClientWriteResponse<TypeConfig>;
type WriteError = RaftError<TypeConfig, ClientWriteError<TypeConfig>>;

/// Awaits a membership write for at most `wait`, mapping openraft's refusals.
async fn bounded(
    write: impl std::future::Future<Output = Result<WriteResponse, WriteError>>,
    wait: Duration,
) -> Result<Written, SubmitError> {
    let Some(result) = tokio_free_timeout(write, wait).await else {
        return Err(SubmitError::CommitTimeout {
            waited_ms: wait.as_millis() as u64,
        });
    };
    match result {
        Ok(resp) => Ok((resp.log_id.index, resp.membership)),
        Err(RaftError::Fatal(_)) => Err(SubmitError::ShuttingDown),
        Err(RaftError::APIError(e)) => Err(match e {
            ClientWriteError::ForwardToLeader(f) => SubmitError::NotLeader {
                leader_hint: f.leader_id,
            },
            ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(_)) => {
                SubmitError::Membership(MembershipRejection::InProgress)
            }
            // A leader just elected has not committed an entry of its term yet: not ready to
            // lead a change, as a leader without its lease is not ready to write (the client
            // retries).
            ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::UncommittedLeaderLog(_),
            ) => SubmitError::NotLeader { leader_hint: None },
            ClientWriteError::ChangeMembershipError(e) => {
                SubmitError::Membership(MembershipRejection::Refused {
                    reason: e.to_string(),
                })
            }
            // The entry was overwritten by a new leader before it committed.
            ClientWriteError::LogEntryDiscarded(_) | ClientWriteError::PreconditionFailed(_) => {
                SubmitError::NotLeader { leader_hint: None }
            }
        }),
    }
}

/// Waits until node `id` has replicated the leader's log as far as it was when the wait began
/// (the entry that added it included).
async fn wait_caught_up(raft: &Raft, id: u64, wait: Duration) -> Result<(), SubmitError> {
    let target = status_of(raft).last_log_index.unwrap_or(0);
    let caught_up = move |s: &NodeStatus| {
        s.role != super::handle::Role::Leader
            || s.replication
                .iter()
                .any(|p| p.id == id && p.matched_index.is_some_and(|m| m >= target))
    };
    match wait_for(raft, Box::new(caught_up), wait).await {
        Ok(s) if s.role == super::handle::Role::Leader => Ok(()),
        Ok(s) | Err(s) if s.role != super::handle::Role::Leader => Err(SubmitError::NotLeader {
            leader_hint: s.leader.filter(|l| *l != s.id),
        }),
        _ => Err(SubmitError::Membership(
            MembershipRejection::CatchUpTimeout {
                id,
                waited_ms: wait.as_millis() as u64,
            },
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::is_host_port;

    #[test]
    fn addresses_must_be_host_and_port() {
        for ok in [
            "127.0.0.1:7001",
            "[::1]:7001",
            "node-4.example:65535",
            "h:1",
        ] {
            assert!(is_host_port(ok), "{ok}");
        }
        for bad in [
            "",
            "127.0.0.1",
            ":7001",
            "h:0",
            "h:65536",
            "h:x",
            "a b:1",
            "h:",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }
}
