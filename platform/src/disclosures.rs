//! The hook through which the platform records its codes in the disclosure ledger. The ledger
//! belongs to whoever embeds the platform (the daemon keeps the user's ledger with its consent
//! store); the platform only says what a code discloses when it is issued, and through which
//! surface it was redeemed. One owner writes the table; the platform never touches it directly.

use crate::Surface;

/// One ledger row a code stands for (never the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeDisclosure<'a> {
    pub app_id: &'a str,
    pub uid: &'a str,
    /// What it discloses ([`crate::Disclosed::as_str`]).
    pub what: &'a str,
    /// The renderer API that issued the code ("login", "getPhoneNumber", "getEmail").
    pub api: &'a str,
    pub at_ms: u64,
}

/// Why the ledger did not record (or stamp) a code's rows; the code is then not issued (or its
/// value does not leave).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The ledger's store cannot write now (full, read-only, a failing disk): nothing was recorded,
    /// and the same call works again once there is room.
    #[error("storage unavailable: {0}")]
    Unwritable(String),
    /// Any other failure, in the ledger's words.
    #[error("{0}")]
    Failed(String),
}

/// The disclosure ledger as the platform writes it.
pub trait Disclosures: Send + Sync + 'static {
    /// Records the rows of a code about to be issued; returns their ids (the code keeps them to
    /// stamp at redemption). A failure means the code is not issued.
    fn issued(&self, rows: &[CodeDisclosure<'_>]) -> Result<Vec<u64>, LedgerError>;

    /// The code whose rows are `ids` could not be issued after all: its rows go.
    fn withdrawn(&self, ids: &[u64]);

    /// The code whose rows are `ids` was redeemed through `surface` at `at_ms`. A failure means
    /// the value does not leave.
    fn redeemed(&self, ids: &[u64], surface: Surface, at_ms: u64) -> Result<(), LedgerError>;
}

/// No ledger: a platform whose embedder keeps none (tests, a service whose daemons keep theirs).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLedger;

impl Disclosures for NoLedger {
    fn issued(&self, _: &[CodeDisclosure<'_>]) -> Result<Vec<u64>, LedgerError> {
        Ok(Vec::new())
    }

    fn withdrawn(&self, _: &[u64]) {}

    fn redeemed(&self, _: &[u64], _: Surface, _: u64) -> Result<(), LedgerError> {
        Ok(())
    }
}
