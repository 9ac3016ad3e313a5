"""The object store, built from Settings (the only place CAPY_S3_* values are used)."""

from __future__ import annotations

from pipeline.config import Settings
from stages.storage import ObjectStore


def object_store(settings: Settings) -> ObjectStore:
    return ObjectStore.from_settings(
        endpoint=settings.s3_endpoint,
        public_endpoint=settings.s3_public_endpoint,
        region=settings.s3_region,
        bucket=settings.s3_bucket,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=False,
    )
