//! Coordinator node (CN): PostgreSQL wire endpoint, catalog, router, 2PC.
//! Not implemented yet: a later issue fills this crate.
