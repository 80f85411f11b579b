"""Notifiers: results topic, webhooks."""

from __future__ import annotations

from sdfleet.notify.base import Notifier
from sdfleet.notify.topic import TopicNotifier

__all__ = ["Notifier", "TopicNotifier"]
