//! Batches of whole source transactions, reduced to the last state of each row:
//! what a source's changes become and what a sink applies, in one target
//! transaction with the checkpoint. Database-neutral: rows arrive through the
//! [`Row`] trait and leave as text.

use std::collections::HashMap;
use std::time::Instant;

use crate::error::ApplyError;
use crate::model::{Before, Key, Position, Row, Values};
use crate::plan::TablePlan;

/// What a row ends up as after the batch.
#[derive(Debug, Clone)]
enum Final {
    /// Present with these carried values (in `TablePlan::carried` order).
    Row(Vec<Option<String>>),
    /// Present, but some carried columns were not sent (unchanged TOAST values
    /// without a FULL replica identity): only what can be computed is updated.
    Partial(Vec<Option<Option<String>>>),
    /// Gone.
    Deleted,
}

/// One table's changes in a batch, reduced to each row's last state.
#[derive(Debug, Default)]
pub struct TableChanges {
    /// The source table was truncated first.
    pub truncated: bool,
    /// Source keys of rows gone.
    pub deleted: Vec<Key>,
    /// Rows present: source key and carried values (`TablePlan::carried` order).
    pub present: Vec<(Key, Values)>,
    /// Rows present but with unsent (unchanged TOAST) values (`None` = not sent).
    pub partial: Vec<(Key, Vec<Option<Option<String>>>)>,
    /// Each changed row as it was before the batch (`None`: unknown).
    pub before: HashMap<Key, Option<Before>>,
}

/// Changes of whole transactions waiting to be applied.
#[derive(Debug, Default)]
pub struct Batch {
    /// Per plan: source key → final state. Only the last state of a row matters
    /// to the target once the batch commits atomically.
    rows: Vec<HashMap<Vec<Option<String>>, Final>>,
    /// Per plan: source key → the row as it was before the batch's first change to
    /// it (`None`: not known, e.g. no full old row), for conflict detection.
    before: Vec<HashMap<Key, Option<Before>>>,
    truncated: Vec<bool>,
    /// Changes received (before reduction).
    pub changes: usize,
    /// Changes per plan (before reduction), for rows/s by table.
    pub changes_by_table: Vec<u64>,
    /// Transactions in the batch.
    pub transactions: usize,
    /// Where the last whole transaction in the batch ends.
    pub end: Option<Position>,
    /// When its first commit arrived (for the linger).
    pub first_commit: Option<Instant>,
    /// Commit time of the first transaction (for lag in seconds).
    pub first_commit_time: Option<std::time::SystemTime>,
    /// A part of a source transaction still being received: applied inside the
    /// target transaction the next part continues, without a checkpoint.
    pub open: bool,
}

impl Batch {
    /// An empty batch for `tables` plans.
    pub fn new(tables: usize) -> Self {
        Self {
            rows: vec![HashMap::new(); tables],
            before: vec![HashMap::new(); tables],
            truncated: vec![false; tables],
            changes_by_table: vec![0; tables],
            ..Self::default()
        }
    }

    /// Nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.transactions == 0
    }

    fn key_of(plan: &TablePlan, data: &dyn Row) -> Result<Vec<Option<String>>, ApplyError> {
        plan.source_key()
            .iter()
            .map(|k| match data.text(k) {
                Some(v) => Ok(text(v)),
                None => Err(ApplyError::Unsafe(format!(
                    "a change to {} arrived without its key column {k}",
                    plan.source.quoted()
                ))),
            })
            .collect()
    }

    /// An inserted row.
    pub fn insert(&mut self, t: usize, plan: &TablePlan, data: &dyn Row) -> Result<(), ApplyError> {
        let key = Self::key_of(plan, data)?;
        let values = plan
            .carried
            .iter()
            .map(|c| data.text(&c.name).and_then(text))
            .collect();
        self.changes += 1;
        self.changes_by_table[t] += 1;
        self.before[t]
            .entry(key.clone())
            .or_insert(Some(Before::Absent));
        self.rows[t].insert(key, Final::Row(values));
        Ok(())
    }

    /// The carried values of a whole old row, when the server sent all of them.
    fn whole(plan: &TablePlan, old: &dyn Row) -> Option<Before> {
        plan.carried
            .iter()
            .map(|c| old.text(&c.name).map(text))
            .collect::<Option<Vec<_>>>()
            .map(Before::Row)
    }

    /// An updated row; `old` is the old key (or whole old row with REPLICA IDENTITY FULL)
    /// when the server sent one.
    pub fn update(
        &mut self,
        t: usize,
        plan: &TablePlan,
        old: Option<&dyn Row>,
        new: &dyn Row,
    ) -> Result<(), ApplyError> {
        let key = Self::key_of(plan, new)?;
        self.changes += 1;
        self.changes_by_table[t] += 1;
        if let Some(old) = old {
            let old_key = Self::key_of(plan, old)?;
            if old_key != key {
                self.before[t]
                    .entry(old_key.clone())
                    .or_insert_with(|| Self::whole(plan, old));
                self.before[t]
                    .entry(key.clone())
                    .or_insert(Some(Before::Absent));
                self.rows[t].insert(old_key, Final::Deleted);
            } else {
                self.before[t]
                    .entry(key.clone())
                    .or_insert_with(|| Self::whole(plan, old));
            }
        } else {
            self.before[t].entry(key.clone()).or_insert(None);
        }
        let previous = self.rows[t].get(&key).cloned();
        let mut values: Vec<Option<Option<String>>> = Vec::with_capacity(plan.carried.len());
        for (i, c) in plan.carried.iter().enumerate() {
            // A column missing from the new tuple is an unchanged TOAST value: take it
            // from the old tuple (FULL identity) or an earlier change in this batch.
            let v = match new.text(&c.name) {
                Some(v) => Some(text(v)),
                None => match (old.and_then(|o| o.text(&c.name)), &previous) {
                    (Some(v), _) => Some(text(v)),
                    (None, Some(Final::Row(prev))) => prev.get(i).cloned(),
                    (None, Some(Final::Partial(prev))) => prev.get(i).cloned().flatten(),
                    _ => None,
                },
            };
            values.push(v);
        }
        let state = if values.iter().all(Option::is_some) {
            Final::Row(values.into_iter().flatten().collect())
        } else {
            Final::Partial(values)
        };
        self.rows[t].insert(key, state);
        Ok(())
    }

    /// A deleted row (`old` holds at least the key).
    pub fn delete(&mut self, t: usize, plan: &TablePlan, old: &dyn Row) -> Result<(), ApplyError> {
        let key = Self::key_of(plan, old)?;
        self.changes += 1;
        self.changes_by_table[t] += 1;
        self.before[t]
            .entry(key.clone())
            .or_insert_with(|| Self::whole(plan, old));
        self.rows[t].insert(key, Final::Deleted);
        Ok(())
    }

    /// The source table was truncated: earlier changes in the batch no longer matter.
    pub fn truncate(&mut self, t: usize) {
        self.changes += 1;
        self.rows[t].clear();
        self.before[t].clear();
        self.truncated[t] = true;
    }

    /// A transaction ended at `end`.
    pub fn commit(&mut self, end: Position, at: Option<std::time::SystemTime>) {
        self.transactions += 1;
        self.end = Some(end);
        self.first_commit.get_or_insert_with(Instant::now);
        if self.first_commit_time.is_none() {
            self.first_commit_time = at;
        }
    }

    /// Takes table `t`'s reduced changes out of the batch.
    pub fn take_table(&mut self, t: usize) -> TableChanges {
        let mut out = TableChanges {
            truncated: std::mem::take(&mut self.truncated[t]),
            before: std::mem::take(&mut self.before[t]),
            ..TableChanges::default()
        };
        for (key, state) in std::mem::take(&mut self.rows[t]) {
            match state {
                Final::Deleted => out.deleted.push(key),
                Final::Row(values) => out.present.push((key, values)),
                Final::Partial(values) => out.partial.push((key, values)),
            }
        }
        out
    }

    /// Empties the batch after it was applied elsewhere.
    pub fn reset(&mut self) {
        let tables = self.rows.len();
        *self = Batch::new(tables);
    }
}

/// A value as the text the mapping SQL reads (invalid UTF-8 replaced).
fn text(v: Option<&[u8]>) -> Option<String> {
    v.map(|b| String::from_utf8_lossy(b).into_owned())
}
