"""The Chromium that tests/test_ui_browser.py drives, and how `make test` gets one on a fresh
machine: Debian's package where the user may install packages (root, or sudo without a
password), else Playwright's own download. Where neither works the page test skips, naming the
command that fixes it; under CI it fails instead, since CI must test the page.

    python -m tests.browser install     # what `make browser` runs; CI=1: exit 1 if none is found
"""
import os
import shutil
import subprocess
import sys

ENV = "CHROMIUM"  # the path of a Chromium (or Chrome) binary to use instead of searching
NAMES = ("chromium", "chromium-browser", "google-chrome")
APT = ["apt-get", "install", "-y", "-qq", "chromium"]
PLAYWRIGHT = [sys.executable, "-m", "playwright", "install", "chromium"]
DOWNLOAD_TIMEOUT_S = 600


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def playwright_download() -> str | None:
    """Where Playwright keeps its own Chromium once `playwright install chromium` has run."""
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            path = playwright.chromium.executable_path
    except Exception:  # playwright missing or its driver cannot start: no browser from it either
        return None
    return path if os.path.isfile(path) else None


def find(env=os.environ, which=shutil.which, downloaded=playwright_download) -> str | None:
    """The browser to drive: $CHROMIUM, else one on PATH, else Playwright's download."""
    if env.get(ENV):
        return env[ENV] if os.access(env[ENV], os.X_OK) else None  # a wrong $CHROMIUM is not overridden
    for name in NAMES:
        if path := which(name):
            return path
    return downloaded()


def can_sudo() -> bool:
    if not shutil.which("sudo"):
        return False
    return subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0


def install_commands(euid: int, which=shutil.which, sudo=can_sudo) -> list[list[str]]:
    """What to try, in order: Debian's package where this user may install it, then Playwright's."""
    commands = []
    if which("apt-get"):
        prefix = [] if euid == 0 else ["sudo", "-n"] if sudo() else None
        if prefix is not None:
            commands += [prefix + ["apt-get", "update", "-qq"], prefix + APT]
    return commands + [PLAYWRIGHT]


def fix_command(euid: int | None = None, which=shutil.which) -> str:
    """The one command a person runs to get the browser (for the skip message)."""
    euid = os.geteuid() if euid is None else euid
    if which("apt-get"):
        return "apt-get install -y chromium" if euid == 0 else "sudo apt-get install -y chromium"
    return f"{os.path.relpath(sys.executable)} -m playwright install chromium"


def missing_message(env=os.environ) -> str:
    if env.get(ENV):
        return f"${ENV}={env[ENV]} is not an executable file"
    return f"no Chromium for the page test: run `{fix_command()}` (or set ${ENV}=/path/to/chromium)"


def require() -> str:
    """The browser's path; or the test skips with the command to run (fails under CI)."""
    import pytest

    if path := find():
        return path
    message = missing_message()
    if under_ci():
        pytest.fail(f"{message}; CI must provide it (make browser)")
    pytest.skip(message)


def install() -> int:
    if path := find():
        print(f"browser for the page test: {path}")
        return 0
    if os.environ.get(ENV):  # the user chose a browser: installing another would not be used
        print(missing_message(), file=sys.stderr)
        return 1 if under_ci() else 0
    for command in install_commands(os.geteuid()):
        print("+", " ".join(command), flush=True)
        try:
            done = subprocess.run(command, timeout=DOWNLOAD_TIMEOUT_S,
                                  env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}).returncode == 0
        except (OSError, subprocess.TimeoutExpired) as error:
            print(f"  failed: {error}")
            done = False
        if done and (path := find()):
            print(f"browser for the page test: {path}")
            return 0
    print(f"no browser could be installed. {missing_message()}; "
          f"{'CI fails' if under_ci() else 'the page test will be skipped'}", file=sys.stderr)
    return 1 if under_ci() else 0


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit(__doc__)
    sys.exit(install())
