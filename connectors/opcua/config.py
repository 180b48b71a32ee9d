"""The configuration of one OPC UA connection (a `connections:` entry with type opcua), and
the node id notations a signal's `node:` accepts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from common.checks import FORBID, Check
from common.duration import Duration

SecurityPolicy = Literal["None", "Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"]
SecurityMode = Literal["None", "Sign", "SignAndEncrypt"]

# ns=2;s=Line1.Press, ns=3;i=1001, ns=1;g=<guid>, ns=1;b=<base64>, i=2258 (namespace 0),
# nsu=urn:plant:press;s=Counter (namespace by URI: survives a changed namespace index),
# and browse paths from the root such as /Objects/2:Press1/2:State or /Objects/Press1/State
# (an element without `ns:` matches the name in any namespace, so it survives a server that
# renumbers its namespaces).
_NODE_ID = re.compile(
    r"^(?:(?:ns=\d+|nsu=[^;]+);)?(?:i=\d+|s=.+|g=[0-9A-Fa-f-]{36}|b=[A-Za-z0-9+/=]+)$"
)
_BROWSE_ELEMENT = re.compile(r"^(?:\d+:)?[^/]+$")


def node_notation_error(text: str) -> str | None:
    """Why `text` is not a node id or browse path we can resolve (None when it is fine)."""
    if text.startswith("/"):
        parts = [p for p in text.split("/") if p]
        if not parts:
            return "an empty browse path"
        bad = [p for p in parts if not _BROWSE_ELEMENT.match(p)]
        if bad:
            return f"browse path element {bad[0]!r} is not `Name` or `ns:Name`"
        return None
    if _NODE_ID.match(text):
        return None
    return (
        f"{text!r} is not a node id (ns=2;s=Name, ns=3;i=1001, nsu=URI;s=Name, i=2258) "
        "or a browse path (/Objects/2:Press/2:State)"
    )


@dataclass(kw_only=True)
class OpcUaConnection:
    __pydantic_config__: ClassVar[dict[str, object]] = FORBID

    id: Annotated[str, Check(min_length=1)]
    type: Literal["opcua"] = "opcua"
    url: Annotated[str, Check(pattern=r"^opc\.tcp://[^/\s]+(/.*)?$")]
    mode: Literal["subscribe", "poll"] = "subscribe"
    publishing_interval: Duration = 0.5
    sampling_interval: Duration = 0.25
    queue_size: Annotated[int, Check(ge=0, le=10_000)] = 10
    deadband: Annotated[float, Check(ge=0.0)] = 0.0  # absolute, on numeric values
    poll_interval: Duration = 1.0
    timeout: Duration = 5.0
    timestamps: Literal["source", "server", "agent"] = "source"
    max_clock_skew: Duration = 10.0
    reconnect_min: Duration = 0.5
    reconnect_max: Duration = 30.0
    security_policy: SecurityPolicy = "None"
    security_mode: SecurityMode = "None"
    certificate: Path | None = None
    private_key: Path | None = None
    private_key_password: str | None = field(default=None, repr=False)
    # The server certificate to trust (DER or PEM); without it a secure connection trusts the
    # certificate the server presents (first use).
    server_certificate: Path | None = None
    application_uri: str = "urn:factory-edge-gateway:edge-agent"
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.security_policy == "None") != (self.security_mode == "None"):
            raise ValueError(
                "security_policy and security_mode go together: both None, or a policy "
                "with Sign or SignAndEncrypt"
            )
        if self.security_policy != "None" and (
            self.certificate is None or self.private_key is None
        ):
            raise ValueError(
                "a secure connection needs certificate and private_key "
                "(create them with `edge-agent keys opcua-cert`)"
            )
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
