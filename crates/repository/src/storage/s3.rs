//! The S3 backend (aws-sdk-s3): bundles and layers stream to and from the bucket (multipart
//! above a threshold), release and build records are created with `If-None-Match: *`, and the
//! app pointer is replaced with `If-Match: <etag>`, so concurrent repositories never lose a
//! release. Retention lists bundles and layers with their `LastModified` and removes objects
//! with `DeleteObject`.

use std::path::Path;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream as SdkStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};

use super::{Blob, BlobEntry, Result, Storage, StorageError, StoredBlob, Versioned, is_digest};
use crate::config::S3Config;

/// Bundles at least this large go up in parts: a single PUT of several GiB cannot resume a
/// failed attempt and holds one connection for minutes.
pub const MULTIPART_THRESHOLD: u64 = 64 * 1024 * 1024;
/// Size of each part: S3 needs at least 5 MiB and allows 10 000 parts, so 32 MiB parts carry
/// bundles up to 312 GiB, far over any limit apprepo allows.
pub const PART_SIZE: u64 = 32 * 1024 * 1024;
/// Parts in flight at once; each streams from the spool file, so memory stays small.
pub const PARTS_IN_FLIGHT: usize = 4;
/// How long to wait for a TCP connection to S3 before calling it unavailable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub struct S3Storage {
    client: Client,
    bucket: String,
    prefix: String,
    where_: String,
}

impl S3Storage {
    /// Builds the client. `secret_access_key` comes from the configured file.
    pub async fn connect(config: &S3Config, secret_access_key: Option<String>) -> Result<Self> {
        use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http_client)
            .timeout_config(timeouts)
            .region(Region::new(config.region.clone()));
        if let Some(key_id) = &config.access_key_id {
            let secret = secret_access_key.ok_or_else(|| {
                StorageError::Failed(
                    "storage.s3.access_key_id is set but secret_access_key_file is not".into(),
                )
            })?;
            loader = loader.credentials_provider(Credentials::new(
                key_id.clone(),
                secret,
                None,
                None,
                "platformx-config",
            ));
        }
        let shared = loader.load().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(config.path_style)
            // Plain checksums only: streaming trailer checksums are not spoken by every
            // S3-compatible server, and apprepo verifies SHA-256 itself.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        let where_ = format!(
            "s3 bucket {} at {}",
            config.bucket,
            config.endpoint.as_deref().unwrap_or("AWS")
        );
        let mut prefix = config.prefix.trim_matches('/').to_string();
        if !prefix.is_empty() {
            prefix.push('/');
        }
        Ok(Self {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            prefix,
            where_,
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Maps an SDK error: no answer or a 5xx means unavailable (retry later); anything else
    /// is a failure worth a log line.
    fn error<E>(&self, what: &str, err: SdkError<E, HttpResponse>) -> StorageError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let unavailable = match &err {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => true,
            SdkError::ResponseError(_) => true,
            SdkError::ServiceError(_) => status_of(&err).is_some_and(|s| s >= 500),
            _ => false,
        };
        let message = format!("{what} on {}: {}", self.where_, DisplayErrorContext(&err));
        if unavailable {
            StorageError::Unavailable(message)
        } else {
            StorageError::Failed(message)
        }
    }

    async fn multipart(&self, key: &str, file: &Path, size: u64) -> Result<()> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.error("starting multipart upload", e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| StorageError::Failed("multipart upload without an id".into()))?
            .to_string();
        let parts = size.div_ceil(PART_SIZE);
        let uploaded: Result<Vec<CompletedPart>> = futures_util::stream::iter(0..parts)
            .map(|index| {
                let upload_id = upload_id.clone();
                async move {
                    let offset = index * PART_SIZE;
                    let length = PART_SIZE.min(size - offset);
                    let body = SdkStream::read_from()
                        .path(file)
                        .offset(offset)
                        .length(Length::Exact(length))
                        .build()
                        .await
                        .map_err(|e| StorageError::Failed(format!("reading spool file: {e}")))?;
                    let number = (index + 1) as i32;
                    let part = self
                        .client
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(&upload_id)
                        .part_number(number)
                        .content_length(length as i64)
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| self.error("uploading part", e))?;
                    Ok(CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(part.e_tag().map(str::to_string))
                        .build())
                }
            })
            .buffered(PARTS_IN_FLIGHT)
            .try_collect()
            .await;
        let completed = match uploaded {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.error("completing multipart upload", e)),
            Err(e) => Err(e),
        };
        if completed.is_err() {
            // Best effort: a leftover upload is also removed by the bucket's lifecycle rule.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        completed
    }
}

#[async_trait]
impl Storage for S3Storage {
    fn describe(&self) -> String {
        self.where_.clone()
    }

    async fn check(&self) -> Result<()> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.error("checking bucket", e))
    }

    async fn blob_size(&self, blob: Blob, sha256: &str) -> Result<Option<u64>> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.key(&blob.key(sha256)))
            .send()
            .await
        {
            Ok(head) => Ok(Some(head.content_length().unwrap_or_default().max(0) as u64)),
            Err(SdkError::ServiceError(e)) if e.err().is_not_found() => Ok(None),
            Err(e) => Err(self.error(&format!("looking up {}", blob.noun()), e)),
        }
    }

    async fn put_blob(&self, blob: Blob, sha256: &str, file: &Path, size: u64) -> Result<()> {
        if self.blob_size(blob, sha256).await?.is_some() {
            return Ok(());
        }
        let key = self.key(&blob.key(sha256));
        if size >= MULTIPART_THRESHOLD {
            return self.multipart(&key, file, size).await;
        }
        let body = SdkStream::from_path(file)
            .await
            .map_err(|e| StorageError::Failed(format!("reading spool file: {e}")))?;
        // Create-only: an object stored meanwhile by another repository has these very bytes
        // (its key is their digest), so finding the key taken is success, and the stored
        // object, with its age for retention, stays as it was.
        let sent = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .if_none_match("*")
            .content_length(size as i64)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err(e) if is_precondition_failed(&e) => Ok(()),
            Err(e) => Err(self.error(&format!("storing {}", blob.noun()), e)),
        }
    }

    async fn get_blob(&self, blob: Blob, sha256: &str) -> Result<Option<StoredBlob>> {
        let got = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(&blob.key(sha256)))
            .send()
            .await
        {
            Ok(got) => got,
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => return Ok(None),
            Err(e) => return Err(self.error(&format!("fetching {}", blob.noun()), e)),
        };
        let size = got.content_length().unwrap_or_default().max(0) as u64;
        let body = futures_util::stream::try_unfold(got.body, |mut body| async move {
            match body.try_next().await {
                Ok(Some(chunk)) => Ok(Some((chunk, body))),
                Ok(None) => Ok(None),
                Err(e) => Err(std::io::Error::other(e)),
            }
        });
        Ok(Some(StoredBlob {
            size,
            body: Box::pin(body),
        }))
    }

    async fn read(&self, key: &str) -> Result<Option<Versioned>> {
        let got = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send()
            .await
        {
            Ok(got) => got,
            Err(SdkError::ServiceError(e)) if e.err().is_no_such_key() => return Ok(None),
            Err(e) => return Err(self.error("reading", e)),
        };
        let version = got.e_tag().unwrap_or_default().to_string();
        let bytes = got
            .body
            .collect()
            .await
            .map_err(|e| {
                StorageError::Unavailable(format!("reading {key} from {}: {e}", self.where_))
            })?
            .into_bytes();
        Ok(Some(Versioned { bytes, version }))
    }

    async fn create(&self, key: &str, bytes: Bytes) -> Result<()> {
        let sent = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .if_none_match("*")
            .body(SdkStream::from(bytes))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err(e) if is_precondition_failed(&e) => Err(StorageError::AlreadyExists(key.into())),
            Err(e) => Err(self.error("creating", e)),
        }
    }

    async fn replace(&self, key: &str, bytes: Bytes, expected: &str) -> Result<()> {
        let sent = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .if_match(expected)
            .body(SdkStream::from(bytes))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err(e) if is_precondition_failed(&e) => Err(StorageError::Conflict(key.into())),
            Err(e) => Err(self.error("replacing", e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let full = self.key(prefix);
        let mut names = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .delimiter("/")
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error("listing", e))?;
            for dir in page.common_prefixes() {
                if let Some(p) = dir.prefix().and_then(|p| p.strip_prefix(&full)) {
                    names.push(p.trim_end_matches('/').to_string());
                }
            }
            for object in page.contents() {
                if let Some(k) = object.key().and_then(|k| k.strip_prefix(&full)) {
                    names.push(k.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    async fn list_blobs(&self, blob: Blob) -> Result<Vec<BlobEntry>> {
        let full = self.key(blob.prefix());
        let mut bundles = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error(&format!("listing {}s", blob.noun()), e))?;
            for object in page.contents() {
                let Some(sha256) = object.key().and_then(|k| k.strip_prefix(&full)) else {
                    continue;
                };
                if !is_digest(sha256) {
                    continue;
                }
                // Without a time the object's age is unknown: call it new, so it is kept.
                let modified = object
                    .last_modified()
                    .and_then(|t| SystemTime::try_from(*t).ok())
                    .unwrap_or_else(SystemTime::now);
                bundles.push(BlobEntry {
                    sha256: sha256.to_string(),
                    modified,
                    size: object.size().unwrap_or_default().max(0) as u64,
                });
            }
        }
        bundles.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        Ok(bundles)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        // S3 answers 204 for an absent key; some compatible servers answer 404 instead.
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("NoSuchKey") || status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.error("deleting", e)),
        }
    }
}

fn is_precondition_failed<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::ServiceError(e) => {
            e.err().code() == Some("PreconditionFailed") || status_of(err) == Some(412)
        }
        _ => false,
    }
}

/// The HTTP status S3 answered with, if it answered at all.
fn status_of<E>(err: &SdkError<E, HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}
