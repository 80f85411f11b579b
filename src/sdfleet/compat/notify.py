"""The seed's result notification for a finished task, with its storage locations filled in."""

from __future__ import annotations

from collections.abc import Callable

from sdfleet.compat import v1alpha1, v1alpha2
from sdfleet.storage.base import BlobStore
from sdfleet.tasks import Origin, TaskEvent, TaskRecord

SeedShape = Callable[[TaskRecord, TaskEvent], dict[str, object]]


def seed_notification(storage: BlobStore) -> SeedShape:
    """A ``TopicNotifier`` ``seed_shape``: image and ``.out`` locations as the seed reports them
    (``s3://bucket/key`` on S3), the shape of the API version the task came in through."""

    def shape(record: TaskRecord, event: TaskEvent) -> dict[str, object]:
        if record.state is not event.state:
            record = record.model_copy(update={"state": event.state})
        result = record.result
        images = [storage.location(k) for k in result.images] if result else []
        output = storage.location(result.output) if result and result.output else None
        if record.task.origin is Origin.V1ALPHA1:
            return v1alpha1.notification(record, images, output)
        return v1alpha2.notification(record, images, output)

    return shape
