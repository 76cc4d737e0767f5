//! The SQLite store's customer cache: identity → customer, and customer → everything a batch
//! reads about it (attributes, identities, current conversation, history, contact times), as
//! the previous batch left it.
//!
//! Exact, not merely fresh: in single-node mode this process makes every write to these rows,
//! always on the store's one writer connection, and each write updates or drops the entries it
//! changes before its transaction commits, while it still holds that connection. A batch reads
//! the cache inside its own transaction on the same connection, so it never sees an entry
//! older than the rows. A merge (in a batch or through the API) drops the whole cache; a
//! failed commit too. PostgreSQL stores have no cache: other nodes write the same rows.

use std::sync::Arc;

use dashmap::DashMap;

use super::batch::CustomerSnapshot;

/// Customers kept unless `[store] cache_customers` says otherwise.
pub const DEFAULT_CACHE_CUSTOMERS: usize = 10_000;

pub(super) struct CustomerCache {
    capacity: usize,
    identities: DashMap<(String, String), String>,
    customers: DashMap<String, Arc<CustomerSnapshot>>,
}

impl CustomerCache {
    /// Holds at most `capacity` customers; 0 keeps none.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            identities: DashMap::new(),
            customers: DashMap::new(),
        }
    }

    /// The customer that owns `identity`, with its snapshot.
    pub fn lookup(&self, identity: &(String, String)) -> Option<(String, Arc<CustomerSnapshot>)> {
        let customer_id = self.identities.get(identity)?.value().clone();
        let snapshot = self.get(&customer_id)?;
        Some((customer_id, snapshot))
    }

    pub fn get(&self, customer_id: &str) -> Option<Arc<CustomerSnapshot>> {
        self.customers
            .get(customer_id)
            .map(|entry| entry.value().clone())
    }

    /// Keeps `snapshot` as `customer_id`'s state, replacing the previous one.
    pub fn put(&self, customer_id: String, snapshot: CustomerSnapshot) {
        if self.capacity == 0 {
            return;
        }
        for identity in &snapshot.identities {
            self.identities.insert(
                (identity.kind.clone(), identity.address.clone()),
                customer_id.clone(),
            );
        }
        if self.customers.len() >= self.capacity && !self.customers.contains_key(&customer_id) {
            self.shrink();
        }
        self.customers.insert(customer_id, Arc::new(snapshot));
    }

    /// Forgets `customer_id` and the identities that lead to it.
    pub fn evict(&self, customer_id: &str) {
        if let Some((_, snapshot)) = self.customers.remove(customer_id) {
            for identity in &snapshot.identities {
                self.identities.remove_if(
                    &(identity.kind.clone(), identity.address.clone()),
                    |_, owner| owner == customer_id,
                );
            }
        }
    }

    /// Forgets everything (after a merge, or a batch whose commit failed).
    pub fn clear(&self) {
        self.customers.clear();
        self.identities.clear();
        metrics::counter!("switchboard_store_cache_clears_total").increment(1);
    }

    pub fn len(&self) -> usize {
        self.customers.len()
    }

    /// Makes room: drops a tenth of the capacity, whichever entries come first (no recency
    /// order: the next batch of those customers reads the store, as on a cold start).
    fn shrink(&self) {
        let excess = (self.customers.len() + 1).saturating_sub(self.capacity);
        let drop = excess.max(self.capacity / 10).max(1);
        let victims: Vec<String> = self
            .customers
            .iter()
            .take(drop)
            .map(|entry| entry.key().clone())
            .collect();
        for customer_id in victims {
            self.evict(&customer_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use serde_json::Map;

    use super::*;
    use crate::router::decide::Identity;
    use crate::store::batch::LoadedConversation;

    fn snapshot(address: &str) -> CustomerSnapshot {
        CustomerSnapshot {
            attributes: Map::new(),
            identities: vec![Identity {
                kind: "email".into(),
                address: address.into(),
            }],
            identities_created: vec![1],
            open_conversations: 1,
            conversation: LoadedConversation {
                id: format!("conversation of {address}"),
                channels: vec!["webchat".into()],
                message_count: 1,
                opened_at: 1,
                agent_id: None,
                queue: None,
            },
            history: VecDeque::new(),
            contact_times: vec![1],
        }
    }

    fn email(address: &str) -> (String, String) {
        ("email".into(), address.into())
    }

    #[test]
    fn holds_at_most_its_capacity_and_forgets_identities_with_their_customer() {
        let cache = CustomerCache::new(10);
        for i in 0..25 {
            cache.put(format!("c{i}"), snapshot(&format!("a{i}@x")));
            assert!(cache.len() <= 10, "{} after {i}", cache.len());
        }
        let kept = (0..25)
            .filter(|i| cache.lookup(&email(&format!("a{i}@x"))).is_some())
            .count();
        assert_eq!(
            kept,
            cache.len(),
            "an identity leads only to a kept customer"
        );
        assert_eq!(cache.identities.len(), cache.len());

        cache.put("c99".into(), snapshot("a99@x"));
        let (id, found) = cache.lookup(&email("a99@x")).unwrap();
        assert_eq!(id, "c99");
        assert_eq!(found.conversation.id, "conversation of a99@x");
        cache.evict("c99");
        assert!(cache.lookup(&email("a99@x")).is_none());
        assert!(cache.get("c99").is_none());
        cache.clear();
        assert_eq!((cache.len(), cache.identities.len()), (0, 0));
    }

    #[test]
    fn capacity_zero_keeps_nothing() {
        let cache = CustomerCache::new(0);
        cache.put("c".into(), snapshot("a@x"));
        assert!(cache.lookup(&email("a@x")).is_none());
        assert_eq!(cache.len(), 0);
    }
}
