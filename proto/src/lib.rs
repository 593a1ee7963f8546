#![doc = include_str!("../README.md")]

pub mod amount;
pub mod event;
pub mod webhook;

pub use amount::{AmountError, MicroUsdc};
pub use event::{Envelope, EnvelopeError, EventData, EventType};
pub use webhook::{SignatureError, sign, verify};
