//! Errors at the `NodeHandle` boundary.
#![allow(missing_docs)] // variant docs name their fields

use crate::batcher::SubmitRejection;
use crate::command::CommandRejection;

/// Why a submission got no receipt.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// This node is not the leader; `leader_hint` is the leader it knows of, if any.
    #[error("not the leader (leader hint: {leader_hint:?})")]
    NotLeader { leader_hint: Option<u64> },
    /// A bounded queue is full; retry later.
    #[error("overloaded: {what} is full")]
    Overloaded { what: &'static str },
    /// The transaction at `position` in the request breaks a rule.
    #[error("transaction {position} of the request is invalid: {reason}")]
    Invalid {
        position: usize,
        reason: SubmitRejection,
    },
    /// The state machine found the committed batch invalid (a bug in the batcher, never input).
    #[error("the batch committed at index {index} was rejected by the state machine")]
    Rejected { index: u64 },
    /// The batch was proposed but did not commit in time (e.g. the leader lost its quorum):
    /// its outcome is unknown. Retrying is safe: submission is idempotent by transaction hash.
    #[error("no commit within {waited_ms} ms; outcome unknown, retry")]
    CommitTimeout { waited_ms: u64 },
    /// The transaction is sequenced in the batch at `index`, but this node cannot prove it: the
    /// batch carries no leader signature, or it was purged from this node's log into a
    /// snapshot. Another node (or a later read) may have it.
    #[error("sequenced at index {index}, but no receipt can be built here")]
    ReceiptUnavailable { index: u64 },
    /// The transaction at `position` names a rollup nobody registered (as of this node's
    /// applied state).
    #[error("transaction {position} of the request is for unknown rollup {rollup_id}")]
    UnknownRollup { position: usize, rollup_id: u64 },
    /// The encrypted transaction at `position` is too short to be a ciphertext (nonce and tag).
    #[error("transaction {position} of the request: encrypted payload of {len} bytes is shorter than a nonce and a tag")]
    MalformedCiphertext { position: usize, len: usize },
    /// A control command (rollup registration, reveal) was refused; nothing changed.
    #[error("command refused: {0}")]
    Command(CommandRejection),
    /// A read asked for `min_index` but this node had applied only `applied` when the wait
    /// ran out.
    #[error("read needs index {min_index} applied; this node is at {applied:?}")]
    ReadTimeout {
        min_index: u64,
        applied: Option<u64>,
    },
    /// A membership change was refused; see [`MembershipRejection`].
    #[error("membership change refused: {0}")]
    Membership(MembershipRejection),
    /// A leadership transfer was refused or did not happen; see [`LeadershipRejection`].
    #[error("leadership transfer: {0}")]
    Leadership(LeadershipRejection),
    /// The node is stopping or stopped.
    #[error("the node is shutting down")]
    ShuttingDown,
}

impl SubmitError {
    /// Every [`SubmitError::kind`], in declaration order.
    pub const KINDS: [&'static str; 13] = [
        "not_leader",
        "overloaded",
        "invalid",
        "rejected",
        "commit_timeout",
        "receipt_unavailable",
        "unknown_rollup",
        "malformed_ciphertext",
        "command",
        "read_timeout",
        "membership",
        "leadership",
        "shutting_down",
    ];

    /// The variant's name in snake case: a stable label for counting errors by kind (metrics).
    pub fn kind(&self) -> &'static str {
        Self::KINDS[self.kind_index()]
    }

    /// This variant's place in [`SubmitError::KINDS`].
    pub fn kind_index(&self) -> usize {
        match self {
            SubmitError::NotLeader { .. } => 0,
            SubmitError::Overloaded { .. } => 1,
            SubmitError::Invalid { .. } => 2,
            SubmitError::Rejected { .. } => 3,
            SubmitError::CommitTimeout { .. } => 4,
            SubmitError::ReceiptUnavailable { .. } => 5,
            SubmitError::UnknownRollup { .. } => 6,
            SubmitError::MalformedCiphertext { .. } => 7,
            SubmitError::Command(_) => 8,
            SubmitError::ReadTimeout { .. } => 9,
            SubmitError::Membership(_) => 10,
            SubmitError::Leadership(_) => 11,
            SubmitError::ShuttingDown => 12,
        }
    }
}

/// Why a membership change (`NodeHandle::change_members`) was refused. Except for
/// `CatchUpTimeout`, nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MembershipRejection {
    /// The client connection presented no certificate from the cluster CA, or a node's
    /// (checked by the network layer: membership changes are for operators only).
    #[error("membership changes need the cluster's client certificate (not a node's)")]
    Unauthenticated,
    /// The address is not `host:port` with a port in 1..=65535.
    #[error("address {addr:?} is not host:port")]
    BadAddress { addr: String },
    /// Node ids start at 1.
    #[error("node id 0 is not valid")]
    BadId,
    /// The node is already a member under another address. Changing a member's address in
    /// place could let two processes act as one voter: remove it, then add it anew.
    #[error("node {id} is already a member at {addr}; remove it first")]
    AddressMismatch { id: u64, addr: String },
    /// The node is a voter; asked to add it as a learner. Demoting is not supported: remove
    /// it, then add it as a learner.
    #[error("node {id} is a voter; remove it first to make it a learner")]
    AlreadyVoter { id: u64 },
    /// The node is not in the membership.
    #[error("node {id} is not a member")]
    NotAMember { id: u64 },
    /// Removing the only voter would leave nobody to decide anything.
    #[error("node {id} is the last voter")]
    LastVoter { id: u64 },
    /// A new node did not catch up with the leader's log within the wait. It stays a learner
    /// (it keeps replicating); asking again resumes, removing it undoes the addition.
    #[error("node {id} did not catch up within {waited_ms} ms; it stays a learner")]
    CatchUpTimeout { id: u64, waited_ms: u64 },
    /// Another membership change has not finished yet; retry when it has.
    #[error("another membership change is in progress")]
    InProgress,
    /// Raft refused the change for another reason (its words).
    #[error("{reason}")]
    Refused { reason: String },
}

/// Why leadership was not moved (`NodeHandle::transfer_leader`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeadershipRejection {
    /// Only a client connection with a certificate from the cluster CA, and not a node's, may
    /// move leadership.
    #[error("moving leadership needs the cluster's client certificate (not a node's)")]
    Unauthenticated,
    /// The named node is not in the membership.
    #[error("node {id} is not a member")]
    NotAMember { id: u64 },
    /// The named node is a learner: only a voter can lead.
    #[error("node {id} is a learner; only a voter can lead")]
    NotAVoter { id: u64 },
    /// The named node has not answered the leader lately: handing it leadership would leave
    /// the cluster without a leader until an election.
    #[error("node {id} has not answered the leader lately")]
    Unreachable { id: u64 },
    /// No other voter has answered the leader lately (or there is none).
    #[error("no other voter has answered the leader lately")]
    NoCandidate,
    /// Another leadership transfer or a membership change is under way; retry when it is done.
    #[error("another leadership transfer or a membership change is in progress")]
    InProgress,
    /// The transfer was started, but another node won an election before the target took over
    /// (the target did not campaign in time).
    #[error("node {leader} won an election instead of the target")]
    TakenOverBy { leader: u64 },
    /// The transfer was started but no other node led within the wait. The old leader no
    /// longer takes writes, so the followers elect a leader after their election timeout.
    #[error("no other node took over within {waited_ms} ms; an election follows")]
    NotTakenOver { waited_ms: u64 },
}

/// Why a node could not start or be driven.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad configuration.
    #[error("invalid node configuration: {reason}")]
    Config { reason: String },
    /// A shard thread or executor could not start.
    #[error("cannot start shard {shard}: {source}")]
    Spawn {
        shard: usize,
        source: std::io::Error,
    },
    /// Opening the log or building Raft failed.
    #[error("cannot start raft on node {id}: {reason}")]
    Raft { id: u64, reason: String },
    /// The node stopped.
    #[error("the node is shutting down")]
    ShuttingDown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_submit_error_has_its_own_kind() {
        let one_of_each = [
            SubmitError::NotLeader { leader_hint: None },
            SubmitError::Overloaded { what: "q" },
            SubmitError::Invalid {
                position: 0,
                reason: SubmitRejection::EmptyTx,
            },
            SubmitError::Rejected { index: 1 },
            SubmitError::CommitTimeout { waited_ms: 1 },
            SubmitError::ReceiptUnavailable { index: 1 },
            SubmitError::UnknownRollup {
                position: 0,
                rollup_id: 9,
            },
            SubmitError::MalformedCiphertext {
                position: 0,
                len: 1,
            },
            SubmitError::Command(CommandRejection::RollupExists { rollup_id: 9 }),
            SubmitError::ReadTimeout {
                min_index: 2,
                applied: None,
            },
            SubmitError::Membership(MembershipRejection::BadId),
            SubmitError::Leadership(LeadershipRejection::Unauthenticated),
            SubmitError::ShuttingDown,
        ];
        let kinds: Vec<&str> = one_of_each.iter().map(SubmitError::kind).collect();
        assert_eq!(kinds, SubmitError::KINDS);
        assert_eq!(SubmitError::ShuttingDown.kind(), "shutting_down");
        assert_eq!(
            SubmitError::CommitTimeout { waited_ms: 5 }.kind(),
            "commit_timeout"
        );
    }
}
