#![doc = include_str!("../README.md")]

pub mod acl;
pub mod amount;
pub mod confirmation;
pub mod event;
pub mod qr;
pub mod rpc;
pub mod topics;
pub mod webhook;

pub use amount::{AmountError, MicroUsdc};
pub use confirmation::{
    Ack, Confirmation, ConfirmationStatus, Jwk, JwkError, StatusMessage, VerifyError,
};
pub use event::{Envelope, EnvelopeError, EventData, EventType};
pub use topics::{TerminalTopics, TopicKind};
pub use webhook::{SignatureError, sign, verify};
