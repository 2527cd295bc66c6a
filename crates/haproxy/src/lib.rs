//! HAProxy's Runtime API as checkplane speaks it (`HAPROXY-NOTES.md`), in one place for
//! haproxy-sync (direct transport) and for the agent on an HAProxy node (relayed transport):
//! the socket exchange ([`socket`]), the reply parsers ([`replies`]), and what is sent —
//! the severity prefix, an action's whole exchange ([`relay::settle`]), the relayed task
//! specs and the allow-list a relaying agent checks ([`relay::relayable`]).

pub mod relay;
pub mod replies;
pub mod socket;
