"""Every YAML example of docs/policy.md is a valid policy (or part of one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from corral.security.engine import Engine
from corral.security.policy import parse_policy

DOC = Path(__file__).parents[3] / "docs" / "policy.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.DOTALL)


def test_doc_has_examples() -> None:
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("block", BLOCKS)
def test_example_is_valid(block: str, tmp_path: Path) -> None:
    data = yaml.safe_load(block)
    if isinstance(data, list):
        data = {"network": {"rules": data}}
    elif "rules" in data:
        data = {"network": data}
    elif "policy" in data:
        data = data["policy"]
    (tmp_path / "test-ca.pem").write_text("x")
    pol = parse_policy(data, base_dir=tmp_path)
    Engine(pol)


def test_first_example_decisions() -> None:
    from corral.security.canon import CanonicalRequest, check_request
    from corral.security.types import RefUpdate

    pol = parse_policy(yaml.safe_load(BLOCKS[0]))
    e = Engine(pol)

    def decide(method: str, url: str, refs: tuple[str, ...] = ()) -> tuple[str, int | None]:
        r = check_request(method, url, [], scheme="https", http_version="1.0")
        assert isinstance(r, CanonicalRequest)
        d = e.decide(r.view("sb", git_updates=tuple(RefUpdate("a" * 40, "b" * 40, x)
                                                    for x in refs)))
        return d.action, d.rule

    assert decide("DELETE", "https://api.github.com/repos/acme/app/labels/x") == ("ask", 1)
    push = "https://github.com/acme/app.git/git-receive-pack"
    assert decide("POST", push, ("refs/heads/main",)) == ("ask", 4)
    assert decide("POST", push, ("refs/heads/f",)) == ("allow", 4)
    assert decide("GET", "https://github.com/acme/app.git/info/refs?service=git-upload-pack"
                  ) == ("allow", 3)
    assert decide("GET", "https://pypi.org/simple/requests/")[0] == "allow"
