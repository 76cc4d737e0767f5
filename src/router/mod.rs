//! The router: rule sets ([`rules`]), the pure decision ([`decide`]), and the service that
//! consumes the router queue, records decisions and publishes assignments ([`service`]).

pub mod decide;
pub mod rules;
