"""Everything a process needs to run the services, built once from settings.

The web app, the CLI and (later) the workers each build one `Runtime`; the
services receive the parts they use as arguments, never from globals.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import Engine

from app.auth.agent_token import AgentTokenSigner
from app.db import make_engine
from app.notify import LocalNotifier, Notifier
from app.settings import Settings
from app.tasks.credentials import CredentialCipher
from pki import CertificateAuthority, load_or_create_pki

# Runs a dispatch's expansion somewhere other than the request (see DispatchRunner).
ExpandFn = Callable[[uuid.UUID], object]


class InProcessDispatchRunner:
    """Expands selector dispatches on a background thread of this process.

    The seam the Celery fan-out replaces: `submit` receives only an id, and
    the expansion it triggers is idempotent, so running it twice is harmless.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dispatch")
        self._expand: ExpandFn | None = None

    def bind(self, expand: ExpandFn) -> None:
        self._expand = expand

    def submit(self, dispatch_id: uuid.UUID) -> None:
        if self._expand is None:
            raise RuntimeError("dispatch runner is not bound to an expansion")
        self._executor.submit(self._expand, dispatch_id)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    ca: CertificateAuthority
    token_signer: AgentTokenSigner
    cipher: CredentialCipher
    notifier: Notifier = field(default_factory=LocalNotifier)
    dispatch_runner: InProcessDispatchRunner = field(default_factory=InProcessDispatchRunner)

    def close(self) -> None:
        self.dispatch_runner.shutdown()
        self.engine.dispose()


def build_runtime(settings: Settings) -> Runtime:
    """Load the PKI (creating it on first start) and connect to the database."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ca = load_or_create_pki(settings.resolved_pki_dir)
    return Runtime(
        settings=settings,
        engine=make_engine(settings.resolved_database_url),
        ca=ca,
        token_signer=AgentTokenSigner(ca.jwt_key),
        cipher=CredentialCipher(ca.credentials_key),
    )
