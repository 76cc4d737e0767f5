//! The router: rule sets ([`rules`]), the pure decision ([`decide`]), rule tests ([`check`]),
//! the service that consumes the router queue, records decisions and publishes assignments
//! ([`service`]), and SLA overflow of assignments that waited too long ([`overflow`]).

pub mod check;
pub mod decide;
pub mod fast;
pub mod functions;
pub mod hours;
pub mod overflow;
pub mod rules;
pub mod service;
pub mod signals;
