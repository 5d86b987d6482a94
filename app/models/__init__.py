"""The tables, one module each; importing this package registers them all."""

from app.models.agent import Agent
from app.models.audit_event import AuditEvent
from app.models.dispatch import Dispatch
from app.models.recovery_challenge import RecoveryChallenge
from app.models.registration_token import RegistrationToken
from app.models.sweep_mark import SweepMark
from app.models.task import Task
from app.models.task_log import TaskLog
from app.models.task_receipt import TaskReceipt

__all__ = [
    "Agent",
    "AuditEvent",
    "Dispatch",
    "RecoveryChallenge",
    "RegistrationToken",
    "SweepMark",
    "Task",
    "TaskLog",
    "TaskReceipt",
]
