//! Membership changes, run on the leader's Raft shard: a node is added as a learner, brought up
//! to date, then made a voter (openraft's joint consensus); a node is removed in one change.
//!
//! Each step is bounded: the membership entry must commit within the node's commit wait
//! (`CommitTimeout`, outcome unknown: the write goes on on its own task), and a new node must
//! catch up within the caller's wait (`CatchUpTimeout`, it stays a learner). Asking again for an
//! addition already in place answers at once with the membership as it is; for a removal
//! already made, `NotAMember`.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};

use super::blocks::tokio_free_timeout;
use super::engine::{status_of, wait_for, Raft};
use super::handle::{
    Member, MemberChange, MembershipChanged, NodeStatus, Role, MEMBER_ADDR_BYTES_MAX,
};
use crate::node::error::{MembershipRejection, SubmitError};
use crate::raft::TypeConfig;

/// Runs `change` on this node, which must be the leader.
pub(crate) async fn change_members(
    raft: &Raft,
    change: MemberChange,
    catch_up: Duration,
    commit_wait: Duration,
) -> Result<MembershipChanged, SubmitError> {
    if !raft.is_leader() {
        let status = status_of(raft);
        return Err(SubmitError::NotLeader {
            // A removed leader that stepped down still names itself: no use to a client.
            leader_hint: status.leader.filter(|l| *l != status.id),
        });
    }
    // A change cut short (its leader lost, or its second entry never written) leaves a joint
    // membership; finish it first, so that what follows starts from one configuration.
    if is_joint(raft) {
        let flatten = ChangeMembers::AddVoterIds(BTreeSet::new());
        run_write(raft, commit_wait, move |r| async move {
            r.change_membership(flatten, false).await
        })
        .await?;
    }
    let status = status_of(raft);
    let refuse = |r| Err(SubmitError::Membership(r));
    match change {
        MemberChange::Add { id, addr, voter } => {
            if id == 0 {
                return refuse(MembershipRejection::BadId);
            }
            if !is_host_port(&addr) {
                return refuse(MembershipRejection::BadAddress { addr });
            }
            let mut written = None;
            match status.members.iter().find(|m| m.id == id) {
                Some(m) if m.addr != addr => {
                    return refuse(MembershipRejection::AddressMismatch {
                        id,
                        addr: m.addr.clone(),
                    })
                }
                Some(m) if m.voter && !voter => {
                    return refuse(MembershipRejection::AlreadyVoter { id })
                }
                Some(m) if m.voter == voter => return Ok(unchanged(status)),
                // A learner at that address, to be promoted: it must be caught up first.
                Some(_) => {}
                None => {
                    let node = BasicNode { addr };
                    let added = run_write(raft, commit_wait, move |r| async move {
                        r.add_learner(id, node, false).await
                    })
                    .await?;
                    written = Some(added);
                }
            }
            wait_caught_up(raft, id, catch_up).await?;
            if !voter {
                return Ok(current(raft, written));
            }
            let add = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
            let written = run_write(raft, commit_wait, move |r| async move {
                r.change_membership(add, false).await
            })
            .await?;
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
            let written = run_write(raft, commit_wait, move |r| async move {
                r.change_membership(change, false).await
            })
            .await?;
            Ok(current(raft, Some(written)))
        }
    }
}

/// Whether the leader's membership is joint (two configurations).
fn is_joint(raft: &Raft) -> bool {
    use openraft::async_runtime::WatchReceiver;
    let m = raft.metrics().borrow_watched().clone();
    m.membership_config.membership().get_joint_config().len() > 1
}

/// `host:port` with a non-empty host and a port in 1..=65535 (the host is resolved when
/// dialing, as for the configured peers); an IPv6 literal in brackets.
fn is_host_port(addr: &str) -> bool {
    if addr.len() > MEMBER_ADDR_BYTES_MAX {
        return false;
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => !host.is_empty() && !host.contains([':', '[', ']']),
    };
    host_ok && !host.chars().any(char::is_whitespace) && port.parse::<u16>().is_ok_and(|p| p != 0)
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

/// Runs a membership write on a task of its own, to its end, and awaits its outcome for at most
/// `wait`, mapping openraft's refusals. Its own task because openraft's `change_membership`
/// writes the joint entry, awaits its commit, then writes the uniform one from the caller's
/// future: a future dropped between the two would leave the cluster in joint consensus.
async fn run_write<F, W>(raft: &Raft, wait: Duration, write: W) -> Result<Written, SubmitError>
where
    W: FnOnce(Raft) -> F + 'static,
    F: std::future::Future<Output = Result<WriteResponse, WriteError>> + 'static,
{
    let (tx, rx) = futures_channel::oneshot::channel();
    let raft = raft.clone();
    glommio::spawn_local(async move {
        let _ = tx.send(write(raft).await);
    })
    .detach();
    let Some(result) = tokio_free_timeout(rx, wait).await else {
        return Err(SubmitError::CommitTimeout {
            waited_ms: wait.as_millis() as u64,
        });
    };
    // The task was dropped: its executor (the node) is stopping.
    let Ok(result) = result else {
        return Err(SubmitError::ShuttingDown);
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
        s.role != Role::Leader
            || s.replication
                .iter()
                .any(|p| p.id == id && p.matched_index.is_some_and(|m| m >= target))
    };
    match wait_for(raft, Box::new(caught_up), wait).await {
        Ok(s) if s.role == Role::Leader => Ok(()),
        Ok(s) | Err(s) if s.role == Role::Shutdown => Err(SubmitError::ShuttingDown),
        Ok(s) | Err(s) if s.role != Role::Leader => Err(SubmitError::NotLeader {
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
