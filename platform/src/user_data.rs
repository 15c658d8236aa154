//! What an app backend verifies of a user's profile: WeChat's signed and encrypted user data.
//!
//! `wx.getUserInfo` / `wx.getUserProfile` answer, beside `userInfo`, four fields a backend checks
//! with the session key it got from `jscode2session` (every WeChat backend library ships the
//! check: wechatpy's `check_wxa_signature` and `WeChatWxaCrypto`, node-easywechat's `Decryptor`,
//! WxJava's `WxMaCryptUtils`, silenceper's `encryptor`):
//! - `rawData`: the JSON text of `userInfo`;
//! - `signature`: lowercase hex `sha1(rawData + session_key)`, the key as its base64 text;
//! - `encryptedData`: base64 of AES-128-CBC with PKCS#7 padding, keyed by the 16 bytes the session
//!   key's standard base64 stands for, over the userInfo fields plus `openId`, `unionId` (where the
//!   app has a union group) and `watermark: {"timestamp", "appid"}`;
//! - `iv`: base64 of the 16 random bytes that encryption used, fresh for every answer.
//!
//! [`make`] is a pure function of its inputs (the time and the randomness are passed in), so it is
//! tested against WeChat's published sample; the platform calls it with the session's current key.

use aes::cipher::{BlockEncryptMut, KeyIvInit, block_padding::Pkcs7};
use base64::{Engine, engine::general_purpose::STANDARD};
use rand::CryptoRng;
use serde_json::{Map, Value};
use sha1::{Digest, Sha1};

type Aes128CbcEnc = cbc::Encryptor<aes::Aes128>;

/// A session key as WeChat's: 16 random bytes, written as standard base64 with its padding (24
/// characters), which is how every backend library decodes it. The bytes never appear in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey([u8; 16]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// A fresh key from `rng`.
    pub fn random<R: CryptoRng + ?Sized>(rng: &mut R) -> SessionKey {
        let mut bytes = [0u8; 16];
        rng.fill_bytes(&mut bytes);
        SessionKey(bytes)
    }

    /// The key a text stands for, when it is standard base64 of exactly 16 bytes (a key stored by
    /// an earlier version, URL-safe without padding, is not one).
    pub fn parse(text: &str) -> Option<SessionKey> {
        let bytes = STANDARD.decode(text).ok()?;
        Some(SessionKey(bytes.try_into().ok()?))
    }

    /// The key's text, as `jscode2session` answers it and as the signature appends it.
    pub fn encode(&self) -> String {
        STANDARD.encode(self.0)
    }
}

/// Who the encrypted data names and for which app: the watermark's `appid` must be the app's
/// (wechatpy and silenceper refuse another), `openId` the user's openid in it, `unionId` present
/// only where the app has a union group.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub app_id: &'a str,
    pub openid: &'a str,
    pub unionid: Option<&'a str>,
}

/// The four fields a getUserInfo / getUserProfile answer carries for the backend. Their `Debug`
/// shows none of them: `rawData` is the user's profile.
#[derive(Clone, PartialEq, Eq)]
pub struct UserCredentials {
    pub raw_data: String,
    pub signature: String,
    pub encrypted_data: String,
    pub iv: String,
}

impl std::fmt::Debug for UserCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserCredentials(..)")
    }
}

/// Why no credentials could be made of a userInfo text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserDataError {
    #[error("userInfo is not a JSON object")]
    NotAnObject,
    /// The userInfo already names a field the encrypted data adds.
    #[error("userInfo must not carry `{0}`")]
    Reserved(&'static str),
}

/// The fields the encrypted data adds to the userInfo ones.
const ADDED: [&str; 3] = ["openId", "unionId", "watermark"];

/// Makes the credentials of `user_info_json` (a JSON object's text, which becomes `rawData`
/// unchanged) for `who`, signed and encrypted with `key`, watermarked at `now_secs` (Unix time),
/// with a fresh IV from `rng`.
pub fn make<R: CryptoRng + ?Sized>(
    user_info_json: &str,
    key: &SessionKey,
    who: Identity<'_>,
    now_secs: u64,
    rng: &mut R,
) -> Result<UserCredentials, UserDataError> {
    let mut iv = [0u8; 16];
    rng.fill_bytes(&mut iv);
    make_with_iv(user_info_json, key, who, now_secs, iv)
}

fn make_with_iv(
    user_info_json: &str,
    key: &SessionKey,
    who: Identity<'_>,
    now_secs: u64,
    iv: [u8; 16],
) -> Result<UserCredentials, UserDataError> {
    let plaintext = plaintext(user_info_json, who, now_secs)?;
    let encrypted = Aes128CbcEnc::new(&key.0.into(), &iv.into()).encrypt_padded_vec_mut::<Pkcs7>(plaintext.as_bytes());
    Ok(UserCredentials {
        raw_data: user_info_json.to_owned(),
        signature: signature(user_info_json, &key.encode()),
        encrypted_data: STANDARD.encode(encrypted),
        iv: STANDARD.encode(iv),
    })
}

/// `signature`: lowercase hex of `sha1(raw_data + session_key)`.
pub fn signature(raw_data: &str, session_key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(raw_data.as_bytes());
    sha.update(session_key.as_bytes());
    hex::encode(sha.finalize())
}

/// The JSON text that is encrypted, laid out as WeChat lays it out: `openId`, the userInfo fields
/// as they are in `user_info_json`, `unionId`, `watermark`.
fn plaintext(user_info_json: &str, who: Identity<'_>, now_secs: u64) -> Result<String, UserDataError> {
    let fields: Map<String, Value> = serde_json::from_str(user_info_json).map_err(|_| UserDataError::NotAnObject)?;
    if let Some(reserved) = ADDED.into_iter().find(|name| fields.contains_key(*name)) {
        return Err(UserDataError::Reserved(reserved));
    }
    // The object's text without its braces: the fields exactly as the renderer got them.
    let inner = user_info_json.trim();
    let inner = inner[1..inner.len() - 1].trim();
    let text = |s: &str| Value::from(s).to_string();
    let mut out = format!("{{\"openId\":{}", text(who.openid));
    if !inner.is_empty() {
        out.push(',');
        out.push_str(inner);
    }
    if let Some(unionid) = who.unionid {
        out.push_str(&format!(",\"unionId\":{}", text(unionid)));
    }
    out.push_str(&format!(",\"watermark\":{{\"timestamp\":{now_secs},\"appid\":{}}}}}", text(who.app_id)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // WeChat's published sample for the open-data decryption (its documentation's demo files in
    // every language carry it): key, IV, appid and the ciphertext WeChat made.
    const SAMPLE_KEY: &str = "tiihtNczf5v6AKRyjwEUhQ==";
    const SAMPLE_IV: &str = "r7BXXKkLb8qrSNn05n0qiA==";
    const SAMPLE_APPID: &str = "wx4f4bc4dec97d474b";
    const SAMPLE_ENCRYPTED: &str = "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS9uT5geRa0W4oTOb1WT7fJlAC+oNPdbB+3hVbJSRgv+4lGOETKUQz6OYStslQ142dNCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyxVLW1zAo6/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn/Hz7saL8xz+W//FRAUid1OksQaQx4CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4PC7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAYB6Y5anaHqZ9J6nKEBvB4DnNLIVWSgARns/8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYVoKlaRv85IfVunYzO0IKXsyl7JCUjCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuyDb/XcxxmK01EpqOyuxINew==";

    #[test]
    fn the_encrypted_data_is_byte_for_byte_wechats_sample() {
        // The sample's userInfo fields, openid, unionid and watermark time (its plaintext).
        let user_info = r#"{"nickName":"Band","gender":1,"language":"zh_CN","city":"Guangzhou","province":"Guangdong","country":"CN","avatarUrl":"http://wx.qlogo.cn/mmopen/vi_32/aSKcBBPpibyKNicHNTMM0qJVh8Kjgiak2AHWr8MHM4WgMEm7GFhsf8OYrySdbvAMvTsw3mo8ibKicsnfN5pRjl1p8HQ/0"}"#;
        let who = Identity {
            app_id: SAMPLE_APPID,
            openid: "oGZUI0egBJY1zhBYw2KhdUfwVJJE",
            unionid: Some("ocMvos6NjeKLIBqg5Mr9QjxrP1FA"),
        };
        let key = SessionKey::parse(SAMPLE_KEY).expect("the sample key is standard base64 of 16 bytes");
        let iv: [u8; 16] = STANDARD.decode(SAMPLE_IV).unwrap().try_into().unwrap();
        let made = make_with_iv(user_info, &key, who, 1_477_314_187, iv).unwrap();
        assert_eq!(made.encrypted_data, SAMPLE_ENCRYPTED);
        assert_eq!(made.iv, SAMPLE_IV);
        assert_eq!(made.raw_data, user_info);
    }

    #[test]
    fn the_signature_is_wechats_sample() {
        // WeChat's published signature sample (rawData, session_key, signature).
        let raw = r#"{"nickName":"Band","gender":1,"language":"zh_CN","city":"Guangzhou","province":"Guangdong","country":"CN","avatarUrl":"http://wx.qlogo.cn/mmopen/vi_32/1vZvI39NWFQ9XM4LtQpFrQJ1xlgZxx3w7bQxKARol6503Iuswjjn6nIGBiaycAjAtpujxyzYsrztuuICqIM5ibXQ/0"}"#;
        assert_eq!(signature(raw, "HyVFkGl5F5OQWJZZaNzBBg=="), "75e81ceda165f4ffa64f4068af58c64b8f54b88c");
        // And SHA-1's own test vector ("abc"), split across the two parts.
        assert_eq!(signature("ab", "c"), "a9993e364706816aba3e25717850c26c9cd0d89d");
    }

    #[test]
    fn keys_are_standard_base64_of_16_bytes() {
        let key = SessionKey::random(&mut rand::rng());
        let text = key.encode();
        assert_eq!(text.len(), 24, "{text}");
        assert!(text.ends_with("=="), "{text}");
        assert_eq!(SessionKey::parse(&text).as_ref(), Some(&key));
        // An earlier version's key (22 characters of URL-safe base64) is not a WeChat key.
        assert_eq!(SessionKey::parse("abcdefghijklmnopqrstuv"), None);
        assert_eq!(SessionKey::parse("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"), None, "24 bytes");
        assert_eq!(format!("{key:?}"), "SessionKey(..)");
    }

    #[test]
    fn each_answer_gets_a_fresh_iv_and_no_union_id_without_a_group() {
        let key = SessionKey::random(&mut rand::rng());
        let who = Identity { app_id: "wxa", openid: "o1", unionid: None };
        let a = make(r#"{"nickName":"N"}"#, &key, who, 5, &mut rand::rng()).unwrap();
        let b = make(r#"{"nickName":"N"}"#, &key, who, 5, &mut rand::rng()).unwrap();
        assert_ne!(a.iv, b.iv);
        assert_ne!(a.encrypted_data, b.encrypted_data);
        assert_eq!(a.signature, b.signature);
        assert_eq!(
            plaintext(r#" { "nickName" : "N" } "#, who, 5).unwrap(),
            r#"{"openId":"o1","nickName" : "N","watermark":{"timestamp":5,"appid":"wxa"}}"#
        );
        assert_eq!(plaintext("{}", who, 5).unwrap(), r#"{"openId":"o1","watermark":{"timestamp":5,"appid":"wxa"}}"#);
    }

    #[test]
    fn what_is_not_a_user_info_object_is_refused() {
        let key = SessionKey::random(&mut rand::rng());
        let who = Identity { app_id: "wxa", openid: "o1", unionid: None };
        for bad in ["", "[]", "\"x\"", "{", "{}{}"] {
            assert_eq!(make(bad, &key, who, 0, &mut rand::rng()), Err(UserDataError::NotAnObject), "{bad:?}");
        }
        let claims = r#"{"nickName":"N","openId":"someone-else"}"#;
        assert_eq!(make(claims, &key, who, 0, &mut rand::rng()), Err(UserDataError::Reserved("openId")));
    }
}
