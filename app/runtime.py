"""Everything a process needs to run the services, built once from settings.

The web app, the CLI and the workers each build one `Runtime`; the
services receive the parts they use as arguments, never from globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine

from app.auth.agent_token import AgentTokenSigner
from app.auth.cache import AgentAuthCache
from app.db import make_engine
from app.jobs import CeleryJobQueue, JobQueue, make_celery, prepare_embedded_broker
from app.notify import LocalNotifier, Notifier, RedisNotifier
from app.recovery.challenges import ChallengeCodec
from app.settings import Settings
from app.tasks.credentials import CredentialCipher
from app.tokens.guard import RegistrationGuard, make_guard
from pki import CertificateAuthority, load_or_create_pki
from pki.task_signing import TaskSigningKeyring, load_or_create_task_signing


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    ca: CertificateAuthority
    token_signer: AgentTokenSigner
    cipher: CredentialCipher
    task_keys: TaskSigningKeyring
    jobs: JobQueue
    notifier: Notifier = field(default_factory=LocalNotifier)
    auth: AgentAuthCache = field(init=False)
    registration_guard: RegistrationGuard = field(init=False)
    recovery_challenges: ChallengeCodec = field(init=False)

    def __post_init__(self) -> None:
        self.auth = AgentAuthCache(
            ca=self.ca, signer=self.token_signer, capacity=self.settings.auth_cache_size
        )
        self.registration_guard = make_guard(self.settings)
        self.recovery_challenges = ChallengeCodec(self.ca.credentials_key)

    def close(self) -> None:
        self.registration_guard.close()
        self.engine.dispose()


def build_runtime(settings: Settings) -> Runtime:
    """Load the PKI (creating it on first start) and connect to the database."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ca = load_or_create_pki(settings.resolved_pki_dir)
    task_keys = load_or_create_task_signing(settings.resolved_pki_dir)
    prepare_embedded_broker(settings, consumer=False)
    notifier: Notifier = (
        RedisNotifier(settings.redis_url, prefix=settings.broker_key_prefix)
        if settings.redis_url
        else LocalNotifier()
    )
    return Runtime(
        settings=settings,
        engine=make_engine(settings.resolved_database_url),
        ca=ca,
        token_signer=AgentTokenSigner(ca.jwt_key),
        cipher=CredentialCipher(ca.credentials_key),
        task_keys=task_keys,
        jobs=CeleryJobQueue(make_celery(settings)),
        notifier=notifier,
    )
