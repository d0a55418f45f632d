//! RSA key generation. ring cannot generate RSA keys, so the RustCrypto `rsa`
//! crate makes the key and hands PKCS#8 DER to ring, which validates it again.
//! Generation takes tens to hundreds of milliseconds: callers run it on the
//! blocking pool.

use rsa::pkcs8::EncodePrivateKey;

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// Unsupported size.
    #[error("key size {0} is not one of 2048, 3072, 4096")]
    Size(u32),
    /// The RSA library failed.
    #[error("RSA key generation failed: {0}")]
    Rsa(String),
}

/// Generates an RSA key of `bits` and returns its PKCS#8 DER.
pub fn generate_pkcs8(bits: u32) -> Result<Vec<u8>, GenerateError> {
    if !matches!(bits, 2048 | 3072 | 4096) {
        return Err(GenerateError::Size(bits));
    }
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, bits as usize)
        .map_err(|e| GenerateError::Rsa(e.to_string()))?;
    let der = key
        .to_pkcs8_der()
        .map_err(|e| GenerateError::Rsa(e.to_string()))?;
    Ok(der.as_bytes().to_vec())
}

/// `generate_pkcs8` on tokio's blocking pool.
pub(crate) async fn generate_pkcs8_async(bits: u32) -> Result<Vec<u8>, GenerateError> {
    tokio::task::spawn_blocking(move || generate_pkcs8(bits))
        .await
        .map_err(|e| GenerateError::Rsa(format!("generator task failed: {e}")))?
}
