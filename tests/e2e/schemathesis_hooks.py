"""Teaches schemathesis the two string formats of sdfleet's OpenAPI document (loaded through
``SCHEMATHESIS_HOOKS`` by ``test_openapi_fuzz``): input images (an http(s) URL or a small real
image, inline) and list cursors (tokens of the SQLite task store the test runs on)."""

from __future__ import annotations

import base64
import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image

from sdfleet.api.openapi import IMAGE_FORMAT
from sdfleet.api.routes.tasks import PAGE_CURSOR
from sdfleet.api.seed_schemas import URL_PATTERN
from sdfleet.store.backends.sqlite import encode_cursor
from sdfleet.tasks import TASK_ID_PATTERN


def _png(size: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (9, 9, 9)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


PNGS = [_png(8), _png(16)]
schemathesis.openapi.format(
    IMAGE_FORMAT,
    st.one_of(
        st.from_regex(URL_PATTERN, fullmatch=True),
        st.sampled_from(PNGS),
        st.sampled_from([f"data:image/png;base64,{p}" for p in PNGS]),
    ),
)
schemathesis.openapi.format(
    PAGE_CURSOR,
    st.builds(
        encode_cursor, st.floats(0, 4e9, allow_nan=False), st.from_regex(TASK_ID_PATTERN, fullmatch=True)
    ),
)
