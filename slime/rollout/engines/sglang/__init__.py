"""SGLang adapter: an HTTP client for SGLang's native API and a launcher for its server (and router)."""

from slime.rollout.engines.sglang.client import SGLangClient
from slime.rollout.engines.sglang.launcher import (
    ServerLaunchError,
    SGLangEngine,
    SGLangServerConfig,
    launch_router,
    server_argv,
)

__all__ = ["SGLangClient", "SGLangEngine", "SGLangServerConfig", "ServerLaunchError", "launch_router", "server_argv"]
