pub mod config;
pub mod router;
pub mod store;
