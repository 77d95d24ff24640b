//! API keys and the access they grant (API.md "Access"): a key belongs to one tenant and has
//! one scope; only the sha256 of the secret is stored, so a key is shown once, at creation.

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{id_col, Db, Result};
use crate::ids::{now_micros, KeyId};

/// The tenant of everything made without a key (auth `none`) and of rows from before tenants.
pub const DEFAULT_TENANT: &str = "default";

/// What a key may do. Ordered: each scope includes the ones before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Read (GET) its tenant's resources.
    Read,
    /// Also upload, submit, cancel and delete in its tenant.
    Write,
    /// Every tenant, and the keys themselves.
    Admin,
}

impl Scope {
    /// The stored and serialised spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    /// Parse the stored spelling.
    pub fn parse(s: &str) -> Option<Scope> {
        Some(match s {
            "read" => Scope::Read,
            "write" => Scope::Write,
            "admin" => Scope::Admin,
            _ => return None,
        })
    }
}

/// Whether `name` can be a tenant: 1–64 of `a-z 0-9 - _`, starting with a letter or digit.
pub fn valid_tenant(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

/// Who is calling: the tenant their key belongs to and its scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The tenant new resources go to.
    pub tenant: String,
    /// What the caller may do.
    pub scope: Scope,
    /// The key used, if any (auth `none` has none).
    pub key_id: Option<KeyId>,
}

impl Caller {
    /// The caller when auth is off: an administrator in the default tenant.
    pub fn unauthenticated_admin() -> Caller {
        Caller {
            tenant: DEFAULT_TENANT.into(),
            scope: Scope::Admin,
            key_id: None,
        }
    }

    /// Whether a resource of `tenant` exists for this caller (others are 404, as if absent).
    pub fn sees(&self, tenant: &str) -> bool {
        self.scope == Scope::Admin || self.tenant == tenant
    }

    /// The tenant lists are restricted to (`None`: every tenant, for administrators).
    pub fn tenant_filter(&self) -> Option<&str> {
        (self.scope != Scope::Admin).then_some(self.tenant.as_str())
    }
}

/// One key, as stored (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Identifier.
    pub id: KeyId,
    /// Who or what it is for.
    pub name: String,
    /// The tenant it acts in.
    pub tenant: String,
    /// What it may do.
    pub scope: Scope,
    /// The first characters of the secret (`wh_` and 8 more), to tell keys apart.
    pub prefix: String,
    /// sha256 (hex) of the secret.
    pub hash: String,
    /// Creation time, µs.
    pub created_at: i64,
    /// Last request made with it (updated at most once a minute), µs.
    pub last_used_at: Option<i64>,
    /// When it was revoked, µs.
    pub revoked_at: Option<i64>,
}

/// The sha256 (hex) a secret is stored and looked up as.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl KeyRecord {
    /// A new key and its secret (`wh_` + 64 hex digits of 256 random bits), shown only now.
    pub fn mint(name: String, scope: Scope, tenant: String) -> (KeyRecord, String) {
        let mut raw = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let secret = format!("wh_{}", hex::encode(raw));
        let record = KeyRecord {
            id: KeyId::new(),
            name,
            tenant,
            scope,
            prefix: secret[..11].to_string(),
            hash: hash_secret(&secret),
            created_at: now_micros(),
            last_used_at: None,
            revoked_at: None,
        };
        (record, secret)
    }

    /// The caller a request with this key is.
    pub fn caller(&self) -> Caller {
        Caller {
            tenant: self.tenant.clone(),
            scope: self.scope,
            key_id: Some(self.id),
        }
    }
}

const COLUMNS: &str = "id, name, tenant, scope, prefix, hash, created_at, last_used_at, revoked_at";

fn from_row(row: &AnyRow) -> Result<KeyRecord> {
    let scope: String = row.try_get("scope")?;
    Ok(KeyRecord {
        id: id_col(row, "id")?,
        name: row.try_get("name")?,
        tenant: row.try_get("tenant")?,
        scope: Scope::parse(&scope).ok_or_else(|| {
            super::Error::Sqlx(sqlx::Error::Decode(format!("unknown scope {scope}").into()))
        })?,
        prefix: row.try_get("prefix")?,
        hash: row.try_get("hash")?,
        created_at: row.try_get("created_at")?,
        last_used_at: row.try_get("last_used_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

/// Store a new key.
pub async fn insert(db: &Db, k: &KeyRecord) -> Result<()> {
    sqlx::query(&format!(
        "insert into api_keys ({COLUMNS}) values ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    ))
    .bind(k.id.to_string())
    .bind(&k.name)
    .bind(&k.tenant)
    .bind(k.scope.as_str())
    .bind(&k.prefix)
    .bind(&k.hash)
    .bind(k.created_at)
    .bind(k.last_used_at)
    .bind(k.revoked_at)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// The live (not revoked) key whose secret is `secret`, marking it used (at most one write a
/// minute per key).
pub async fn authenticate(db: &Db, secret: &str) -> Result<Option<KeyRecord>> {
    let row = sqlx::query(&format!(
        "select {COLUMNS} from api_keys where hash = $1 and revoked_at is null"
    ))
    .bind(hash_secret(secret))
    .fetch_optional(db.pool())
    .await?;
    let Some(key) = row.as_ref().map(from_row).transpose()? else {
        return Ok(None);
    };
    let now = now_micros();
    if key.last_used_at.is_none_or(|t| now - t > 60_000_000) {
        sqlx::query("update api_keys set last_used_at = $1 where id = $2")
            .bind(now)
            .bind(key.id.to_string())
            .execute(db.pool())
            .await?;
    }
    Ok(Some(key))
}

/// One live (not revoked) key by id.
pub async fn get(db: &Db, id: KeyId) -> Result<Option<KeyRecord>> {
    let row = sqlx::query(&format!(
        "select {COLUMNS} from api_keys where id = $1 and revoked_at is null"
    ))
    .bind(id.to_string())
    .fetch_optional(db.pool())
    .await?;
    row.as_ref().map(from_row).transpose()
}

/// A page of live keys, newest first (revoked keys stay in the table, for the record, but
/// are gone from the API).
pub async fn list(db: &Db, after: Option<KeyId>, limit: i64) -> Result<Vec<KeyRecord>> {
    let rows = sqlx::query(&format!(
        "select {COLUMNS} from api_keys where ($1 = '' or id < $1) and revoked_at is null \
         order by id desc limit $2"
    ))
    .bind(after.map(|a| a.to_string()).unwrap_or_default())
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// Revoke a key; returns whether a live key was revoked (`false`: unknown or revoked before).
pub async fn revoke(db: &Db, id: KeyId) -> Result<bool> {
    let done =
        sqlx::query("update api_keys set revoked_at = $1 where id = $2 and revoked_at is null")
            .bind(now_micros())
            .bind(id.to_string())
            .execute(db.pool())
            .await?;
    Ok(done.rows_affected() > 0)
}
