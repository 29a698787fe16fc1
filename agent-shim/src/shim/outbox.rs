//! Sequenced messages kept until the server acknowledges them, and tool calls awaiting results.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::protocol::AnsweredCall;

/// Default bounds: the agent's output stops being read when either is reached.
pub const MAX_MESSAGES: usize = 8192;
pub const MAX_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    /// The encoded frame.
    pub text: String,
}

/// What an `ack` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// Entries up to the seq were released.
    Released { count: usize },
    /// Already acknowledged before; nothing changed.
    Stale,
    /// The server acknowledged a seq the shim never sent; everything sent was released.
    BeyondSent { highest_sent: u64 },
}

/// Unacknowledged sequenced messages, oldest first.
#[derive(Debug)]
pub struct Outbox {
    entries: VecDeque<Entry>,
    next_seq: u64,
    acked: u64,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new(MAX_MESSAGES, MAX_BYTES)
    }
}

impl Outbox {
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        Outbox {
            entries: VecDeque::new(),
            next_seq: 1,
            acked: 0,
            bytes: 0,
            max_messages,
            max_bytes,
        }
    }

    /// The seq the next pushed message gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Highest seq the server acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Highest seq handed out so far (0 if none).
    pub fn highest_sent(&self) -> u64 {
        self.next_seq - 1
    }

    /// Appends a message; `encode` receives its seq and returns the frame text.
    pub fn push(&mut self, encode: impl FnOnce(u64) -> String) -> &Entry {
        let seq = self.next_seq;
        self.next_seq += 1;
        let text = encode(seq);
        self.bytes += text.len();
        self.entries.push_back(Entry { seq, text });
        &self.entries[self.entries.len() - 1]
    }

    /// True when the buffer reached a bound: stop producing until acks release space.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.max_messages || self.bytes >= self.max_bytes
    }

    pub fn all_acked(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Cumulative acknowledgement: releases every entry with `seq <= up_to`.
    pub fn ack(&mut self, up_to: u64) -> AckOutcome {
        if up_to <= self.acked {
            return AckOutcome::Stale;
        }
        let highest_sent = self.highest_sent();
        let mut count = 0;
        while let Some(front) = self.entries.front() {
            if front.seq > up_to {
                break;
            }
            self.bytes -= front.text.len();
            self.entries.pop_front();
            count += 1;
        }
        if up_to > highest_sent {
            self.acked = highest_sent;
            AckOutcome::BeyondSent { highest_sent }
        } else {
            self.acked = up_to;
            AckOutcome::Released { count }
        }
    }

    /// A fresh shim joining a run whose earlier shim already used seqs up to `last_acked`:
    /// continue numbering after it. Only valid before anything was pushed.
    pub fn continue_after(&mut self, last_acked: u64) -> bool {
        if self.next_seq != 1 || !self.entries.is_empty() {
            return false;
        }
        self.next_seq = last_acked + 1;
        self.acked = last_acked;
        true
    }

    /// Entries with `seq > after`, in order: what to resend after a reconnect.
    pub fn after(&self, after: u64) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(move |e| e.seq > after)
    }
}

/// Tool calls sent to the server and not yet answered, in the order they were made.
#[derive(Debug, Default)]
pub struct PendingCalls {
    /// Unanswered calls by id: the seq of their `tool_call` frame, and the tool.
    by_id: HashMap<String, (u64, String)>,
    /// Answered calls whose `tool_call` frame is not acked yet, by that frame's seq.
    answered: BTreeMap<u64, AnsweredCall>,
    /// The latest answered calls whose frames were acked (their results may still not be
    /// stored when the server that answered them stops), oldest first.
    recent: VecDeque<AnsweredCall>,
}

/// Answered calls whose frames were acked that `hello` still lists.
pub const RECENT_ANSWERS: usize = 64;

impl PendingCalls {
    /// A call of `tool` sent in the frame numbered `seq`.
    pub fn insert(&mut self, call_id: String, seq: u64, tool: String) {
        self.by_id.insert(call_id, (seq, tool));
    }

    /// Whether a call with this id waits for its answer.
    pub fn is_pending(&self, call_id: &str) -> bool {
        self.by_id.contains_key(call_id)
    }

    /// Marks a call answered; false if it was not pending (unknown or answered before).
    pub fn answer(&mut self, call_id: &str, ok: bool, error_code: Option<String>) -> bool {
        match self.by_id.remove(call_id) {
            Some((seq, tool)) => {
                self.answered.insert(
                    seq,
                    AnsweredCall {
                        call_id: call_id.to_string(),
                        tool,
                        ok,
                        error_code,
                    },
                );
                true
            }
            None => false,
        }
    }

    /// Frames up to `seq` are stored by the server: their answered calls are settled.
    pub fn acked(&mut self, seq: u64) {
        let later = self.answered.split_off(&(seq + 1));
        let settled = std::mem::replace(&mut self.answered, later);
        for (_, call) in settled {
            if self.recent.len() == RECENT_ANSWERS {
                self.recent.pop_front();
            }
            self.recent.push_back(call);
        }
    }

    /// Unanswered calls, in the order they were made.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<(&String, &(u64, String))> = self.by_id.iter().collect();
        ids.sort_by_key(|(_, (seq, _))| *seq);
        ids.into_iter().map(|(id, _)| id.clone()).collect()
    }

    /// Answered calls the server may not have recorded (the latest settled ones, then those
    /// whose frames are not acked), in the order they were made.
    pub fn answered_calls(&self) -> Vec<AnsweredCall> {
        self.recent
            .iter()
            .chain(self.answered.values())
            .cloned()
            .collect()
    }

    pub fn clear(&mut self) {
        self.by_id.clear();
        self.answered.clear();
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(outbox: &mut Outbox, text: &str) -> u64 {
        outbox.push(|_| text.to_owned()).seq
    }

    #[test]
    fn seqs_start_at_one_and_acks_are_cumulative() {
        let mut outbox = Outbox::default();
        assert_eq!(push(&mut outbox, "a"), 1);
        assert_eq!(push(&mut outbox, "b"), 2);
        assert_eq!(push(&mut outbox, "c"), 3);
        assert_eq!(outbox.ack(2), AckOutcome::Released { count: 2 });
        assert_eq!(outbox.acked(), 2);
        assert_eq!(outbox.ack(1), AckOutcome::Stale);
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox.ack(3), AckOutcome::Released { count: 1 });
        assert!(outbox.all_acked());
    }

    #[test]
    fn resend_lists_everything_above_last_acked_in_order() {
        let mut outbox = Outbox::default();
        for text in ["a", "b", "c", "d"] {
            push(&mut outbox, text);
        }
        outbox.ack(1);
        let resend: Vec<u64> = outbox.after(2).map(|e| e.seq).collect();
        assert_eq!(resend, vec![3, 4]);
        // The server may have persisted less than it acked to us before; we resend what we have.
        let resend: Vec<u64> = outbox.after(0).map(|e| e.seq).collect();
        assert_eq!(resend, vec![2, 3, 4]);
    }

    #[test]
    fn bounded_by_count_and_bytes() {
        let mut outbox = Outbox::new(2, 1024);
        push(&mut outbox, "a");
        assert!(!outbox.is_full());
        push(&mut outbox, "b");
        assert!(outbox.is_full());
        outbox.ack(1);
        assert!(!outbox.is_full());

        let mut outbox = Outbox::new(100, 10);
        push(&mut outbox, "12345");
        assert!(!outbox.is_full());
        push(&mut outbox, "67890");
        assert!(outbox.is_full());
        outbox.ack(2);
        assert!(!outbox.is_full());
    }

    #[test]
    fn ack_beyond_sent_is_clamped() {
        let mut outbox = Outbox::default();
        push(&mut outbox, "a");
        assert_eq!(outbox.ack(5), AckOutcome::BeyondSent { highest_sent: 1 });
        assert_eq!(outbox.acked(), 1);
        assert_eq!(push(&mut outbox, "b"), 2);
    }

    #[test]
    fn fresh_outbox_continues_after_an_earlier_shim() {
        let mut outbox = Outbox::default();
        assert!(outbox.continue_after(7));
        assert_eq!(push(&mut outbox, "a"), 8);
        assert!(!outbox.continue_after(9));
    }

    #[test]
    fn pending_calls_keep_call_order_and_answer_once() {
        let mut pending = PendingCalls::default();
        pending.insert("c2".into(), 1, "t".into());
        pending.insert("c1".into(), 2, "t".into());
        pending.insert("c3".into(), 4, "t".into());
        assert!(pending.answer("c1", true, None));
        assert!(!pending.answer("c1", true, None));
        assert_eq!(pending.ids(), vec!["c2".to_owned(), "c3".to_owned()]);
    }

    #[test]
    fn answered_calls_are_listed_until_their_frame_is_acked_then_among_the_recent() {
        let mut pending = PendingCalls::default();
        pending.insert("c1".into(), 3, "fs.read_file".into());
        pending.insert("c2".into(), 5, "fs.search".into());
        pending.insert("c3".into(), 7, "fs.list_dir".into());
        assert!(pending.answer("c2", false, Some("not_found".into())));
        assert!(pending.answer("c1", true, None));
        let ids = |p: &PendingCalls| -> Vec<String> {
            p.answered_calls().into_iter().map(|a| a.call_id).collect()
        };
        assert_eq!(ids(&pending), ["c1", "c2"]);
        let listed = pending.answered_calls();
        assert_eq!(listed[1].error_code.as_deref(), Some("not_found"));
        assert_eq!(listed[1].tool, "fs.search");
        pending.acked(6);
        assert_eq!(ids(&pending), ["c1", "c2"], "settled, still recent");
        for i in 0..RECENT_ANSWERS as u64 {
            pending.insert(format!("x{i}"), 10 + i, "t".into());
            assert!(pending.answer(&format!("x{i}"), true, None));
        }
        pending.acked(10 + RECENT_ANSWERS as u64);
        let listed = ids(&pending);
        assert_eq!(listed.len(), RECENT_ANSWERS);
        assert_eq!(listed[0], "x0", "the oldest settled ones go first");
        assert_eq!(pending.ids(), ["c3"]);
    }
}
