"""Image build helper: the dependencies of the given extras, and the project's metadata.

`python requirements.py pyproject.toml ops SITE_PACKAGES` prints the requirement lines of the
base dependencies plus the `ops` extra (for `pip install -r`), so the dependency layer depends
on pyproject.toml only and editing code never reinstalls it. It also writes a minimal
`guardfleet-<version>.dist-info` into SITE_PACKAGES: the code runs from /app without being
pip-installed, and this is what lets `importlib.metadata.version("guardfleet")` (the release
in /v1/version) still answer.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def main() -> None:
    pyproject, extras, site_packages = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = list(project["dependencies"])
    for extra in filter(None, extras.split(",")):
        requirements += project["optional-dependencies"][extra]
    dist_info = site_packages / f"{project['name']}-{project['version']}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    print("\n".join(requirements))


if __name__ == "__main__":
    main()
