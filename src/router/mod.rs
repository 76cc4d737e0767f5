//! The router: rule sets ([`rules`]), the pure decision ([`decide`]), rule tests ([`check`]),
//! and the service that consumes the router queue, records decisions and publishes assignments
//! ([`service`]).

pub mod check;
pub mod decide;
pub mod functions;
pub mod hours;
pub mod rules;
pub mod service;
pub mod signals;
