//! In-memory caches of watched objects, indexed for the lookups controllers make on every sync:
//! by key, by namespace, and by a per-kind group within a namespace (e.g. the Service a slice
//! belongs to). Values are shared (`Arc`) so a sync copies pointers, not objects.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use crate::model::ObjectKey;

/// Derives the group of a value within its namespace, if it has one.
pub type GroupFn<V> = fn(&V) -> Option<String>;

pub struct Store<V> {
    inner: RwLock<Inner<V>>,
    group_of: Option<GroupFn<V>>,
}

struct Inner<V> {
    by_namespace: HashMap<String, HashMap<String, Arc<V>>>,
    groups: HashMap<ObjectKey, HashSet<String>>,
    len: usize,
}

impl<V> Default for Store<V> {
    fn default() -> Self {
        Self::new(None)
    }
}

impl<V> Store<V> {
    pub fn new(group_of: Option<GroupFn<V>>) -> Self {
        Self {
            inner: RwLock::new(Inner {
                by_namespace: HashMap::new(),
                groups: HashMap::new(),
                len: 0,
            }),
            group_of,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner<V>> {
        // Writers never leave the maps half-updated across a panic point that matters; keep serving.
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner<V>> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self, key: &ObjectKey) -> Option<Arc<V>> {
        self.read()
            .by_namespace
            .get(&key.namespace)?
            .get(&key.name)
            .cloned()
    }

    /// Stores `value` under `key`, returning what it replaced.
    pub fn insert(&self, key: ObjectKey, value: Arc<V>) -> Option<Arc<V>> {
        let group = self.group_of.and_then(|f| f(&value));
        let mut inner = self.write();
        let old = inner
            .by_namespace
            .entry(key.namespace.clone())
            .or_default()
            .insert(key.name.clone(), value);
        if let Some(old) = &old {
            let old_group = self.group_of.and_then(|f| f(old));
            if old_group != group {
                Self::ungroup(&mut inner, &key, old_group);
            }
        } else {
            inner.len += 1;
        }
        if let Some(g) = group {
            inner
                .groups
                .entry(ObjectKey::new(&key.namespace, g))
                .or_default()
                .insert(key.name);
        }
        old
    }

    pub fn remove(&self, key: &ObjectKey) -> Option<Arc<V>> {
        let mut inner = self.write();
        let ns = inner.by_namespace.get_mut(&key.namespace)?;
        let old = ns.remove(&key.name)?;
        if ns.is_empty() {
            inner.by_namespace.remove(&key.namespace);
        }
        inner.len -= 1;
        let old_group = self.group_of.and_then(|f| f(&old));
        Self::ungroup(&mut inner, key, old_group);
        Some(old)
    }

    fn ungroup(inner: &mut Inner<V>, key: &ObjectKey, group: Option<String>) {
        let Some(g) = group else { return };
        let gk = ObjectKey::new(&key.namespace, g);
        if let Some(members) = inner.groups.get_mut(&gk) {
            members.remove(&key.name);
            if members.is_empty() {
                inner.groups.remove(&gk);
            }
        }
    }

    /// Every value in `namespace` that satisfies `keep`.
    pub fn list_namespace(&self, namespace: &str, mut keep: impl FnMut(&V) -> bool) -> Vec<Arc<V>> {
        self.read()
            .by_namespace
            .get(namespace)
            .map(|m| m.values().filter(|v| keep(v)).cloned().collect())
            .unwrap_or_default()
    }

    /// Every value in every namespace that satisfies `keep`.
    pub fn list_all(&self, mut keep: impl FnMut(&V) -> bool) -> Vec<Arc<V>> {
        self.read()
            .by_namespace
            .values()
            .flat_map(|m| m.values())
            .filter(|v| keep(v))
            .cloned()
            .collect()
    }

    /// Every value of the group `group` (namespace and group name).
    pub fn list_group(&self, group: &ObjectKey) -> Vec<Arc<V>> {
        let inner = self.read();
        let Some(names) = inner.groups.get(group) else {
            return Vec::new();
        };
        let Some(ns) = inner.by_namespace.get(&group.namespace) else {
            return Vec::new();
        };
        names.iter().filter_map(|n| ns.get(n).cloned()).collect()
    }

    pub fn keys(&self) -> Vec<ObjectKey> {
        self.read()
            .by_namespace
            .iter()
            .flat_map(|(ns, m)| m.keys().map(move |n| ObjectKey::new(ns, n)))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.read().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Item {
        group: Option<String>,
        v: u32,
    }

    fn item(group: Option<&str>, v: u32) -> Arc<Item> {
        Arc::new(Item {
            group: group.map(Into::into),
            v,
        })
    }

    fn store() -> Store<Item> {
        Store::new(Some(|i: &Item| i.group.clone()))
    }

    #[test]
    fn insert_get_remove_and_namespaces() {
        let s = store();
        assert_eq!(s.insert(ObjectKey::new("a", "x"), item(None, 1)), None);
        s.insert(ObjectKey::new("a", "y"), item(None, 2));
        s.insert(ObjectKey::new("b", "x"), item(None, 3));
        assert_eq!(s.len(), 3);
        assert_eq!(
            s.insert(ObjectKey::new("a", "x"), item(None, 4)).map(|i| i.v),
            Some(1)
        );
        assert_eq!(s.len(), 3);
        let mut in_a: Vec<u32> = s.list_namespace("a", |_| true).iter().map(|i| i.v).collect();
        in_a.sort_unstable();
        assert_eq!(in_a, [2, 4]);
        assert_eq!(s.list_namespace("a", |i| i.v > 3).len(), 1);
        assert_eq!(s.remove(&ObjectKey::new("b", "x")).map(|i| i.v), Some(3));
        assert!(s.list_namespace("b", |_| true).is_empty());
        assert_eq!(s.remove(&ObjectKey::new("b", "x")), None);
        assert_eq!(s.len(), 2);
        let mut keys = s.keys();
        keys.sort();
        assert_eq!(keys, [ObjectKey::new("a", "x"), ObjectKey::new("a", "y")]);
    }

    #[test]
    fn groups_follow_changes_of_the_group_value() {
        let s = store();
        s.insert(ObjectKey::new("ns", "s1"), item(Some("web"), 1));
        s.insert(ObjectKey::new("ns", "s2"), item(Some("web"), 2));
        s.insert(ObjectKey::new("ns", "s3"), item(Some("db"), 3));
        s.insert(ObjectKey::new("other", "s4"), item(Some("web"), 4));
        let web = ObjectKey::new("ns", "web");
        assert_eq!(s.list_group(&web).len(), 2);
        s.insert(ObjectKey::new("ns", "s2"), item(Some("db"), 5)); // relabelled
        assert_eq!(s.list_group(&web).iter().map(|i| i.v).collect::<Vec<_>>(), [1]);
        assert_eq!(s.list_group(&ObjectKey::new("ns", "db")).len(), 2);
        s.remove(&ObjectKey::new("ns", "s1"));
        assert!(s.list_group(&web).is_empty());
        s.insert(ObjectKey::new("ns", "s3"), item(None, 6)); // label removed
        assert_eq!(
            s.list_group(&ObjectKey::new("ns", "db"))
                .iter()
                .map(|i| i.v)
                .collect::<Vec<_>>(),
            [5]
        );
    }
}
