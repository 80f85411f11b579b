"""Notifiers: results topic, webhooks."""

from __future__ import annotations

from sdfleet.notify.base import Notifier
from sdfleet.notify.topic import TopicNotifier
from sdfleet.notify.webhook import WebhookNotifier

__all__ = ["Notifier", "TopicNotifier", "WebhookNotifier"]
