//! Values the dashboard hands to the browser and must get back unchanged and
//! unread: a started sign-in lives in a sealed cookie instead of a server-side
//! table, so nobody can evict other people's sign-ins by starting many of their
//! own (a table needs a bound, and a bound can be flooded).
//!
//! Sealed = encrypted and authenticated (ChaCha20-Poly1305) with a key made at
//! start: a restart invalidates sign-ins in progress, as it does sessions.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("no randomness available")]
    Random,
    #[error("not a value this dashboard sealed (tampered with, or from before a restart)")]
    Invalid,
}

impl Sealer {
    pub fn new() -> Result<Self, SealError> {
        let rng = SystemRandom::new();
        let mut key = [0u8; 32];
        rng.fill(&mut key).map_err(|_| SealError::Random)?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &key).map_err(|_| SealError::Random)?;
        Ok(Self {
            key: LessSafeKey::new(key),
            rng,
        })
    }

    /// `purpose` is bound into the seal: a value sealed for one use does not open
    /// for another.
    pub fn seal(&self, purpose: &str, plain: &[u8]) -> Result<String, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(purpose.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SealError::Random)?;
        let mut out = nonce.to_vec();
        out.extend(buf);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    pub fn open(&self, purpose: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
        let raw = URL_SAFE_NO_PAD.decode(sealed).map_err(|_| SealError::Invalid)?;
        if raw.len() < NONCE_LEN {
            return Err(SealError::Invalid);
        }
        let (nonce, body) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Invalid)?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, ring::aead::Aad::from(purpose.as_bytes()), &mut body)
            .map_err(|_| SealError::Invalid)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_unchanged_for_their_purpose_and_sealer() -> Result<(), SealError> {
        let s = Sealer::new()?;
        let sealed = s.seal("login", b"secret verifier")?;
        assert!(!sealed.contains("secret"), "the browser cannot read it");
        assert_eq!(s.open("login", &sealed)?, b"secret verifier");
        assert_eq!(s.open("other", &sealed), Err(SealError::Invalid));
        // One flipped character anywhere breaks it.
        let mut bytes = sealed.clone().into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            s.open("login", &String::from_utf8_lossy(&bytes)),
            Err(SealError::Invalid)
        );
        // Another process (a restart) has another key.
        assert_eq!(Sealer::new()?.open("login", &sealed), Err(SealError::Invalid));
        assert_eq!(s.open("login", "x"), Err(SealError::Invalid));
        Ok(())
    }
}
