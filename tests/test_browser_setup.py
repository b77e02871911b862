"""tests/browser.py: which browser the page test gets, how `make browser` installs one, and that
a missing browser skips with the command to run, or fails under CI."""
import pytest

from tests import browser


def which_only(*present: str):
    return lambda name: f"/usr/bin/{name}" if name in present else None


def nothing_downloaded():
    return None


def test_the_first_browser_found_wins_and_chromium_overrides_the_search(tmp_path):
    assert browser.find({}, which_only("chromium-browser", "google-chrome"), nothing_downloaded) \
        == "/usr/bin/chromium-browser"
    assert browser.find({}, which_only(), lambda: "/cache/chrome") == "/cache/chrome"
    assert browser.find({}, which_only(), nothing_downloaded) is None
    mine = tmp_path / "chrome"
    mine.write_text("#!/bin/sh\n")
    mine.chmod(0o755)
    assert browser.find({"CHROMIUM": str(mine)}, which_only("chromium"), nothing_downloaded) == str(mine)
    assert browser.find({"CHROMIUM": str(tmp_path / "none")}, which_only("chromium"), nothing_downloaded) is None


def test_root_installs_debians_package_then_tries_playwrights():
    commands = browser.install_commands(0, which_only("apt-get"), sudo=lambda: False)
    assert commands == [["apt-get", "update", "-qq"], browser.APT, browser.PLAYWRIGHT]


def test_a_user_uses_passwordless_sudo_or_else_only_playwrights_download():
    with_sudo = browser.install_commands(1000, which_only("apt-get"), sudo=lambda: True)
    assert with_sudo[1] == ["sudo", "-n", *browser.APT]
    assert browser.install_commands(1000, which_only("apt-get"), sudo=lambda: False) == [browser.PLAYWRIGHT]
    assert browser.install_commands(0, which_only(), sudo=lambda: True) == [browser.PLAYWRIGHT]


def test_the_fix_names_one_command_for_this_user():
    assert browser.fix_command(0, which_only("apt-get")) == "apt-get install -y chromium"
    assert browser.fix_command(1000, which_only("apt-get")) == "sudo apt-get install -y chromium"
    assert browser.fix_command(1000, which_only()).endswith("-m playwright install chromium")


@pytest.fixture
def no_browser(monkeypatch):
    monkeypatch.setattr(browser, "find", lambda: None)
    monkeypatch.delenv("CHROMIUM", raising=False)


def test_without_a_browser_the_page_test_skips_with_the_command(no_browser, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"run `.*chromium`"):
        browser.require()


@pytest.mark.parametrize("value", ["1", "true"])
def test_under_ci_a_missing_browser_fails(no_browser, monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="CI must provide it"):
        browser.require()


def test_install_does_nothing_when_a_browser_is_there(monkeypatch, capsys):
    monkeypatch.setattr(browser, "find", lambda: "/usr/bin/chromium")
    monkeypatch.setattr(browser, "install_commands", lambda euid: pytest.fail("nothing to install"))
    assert browser.install() == 0
    assert "/usr/bin/chromium" in capsys.readouterr().out


@pytest.mark.parametrize("ci, code", [("", 0), ("1", 1)])
def test_install_that_fails_says_what_to_run_and_fails_only_under_ci(no_browser, monkeypatch, capsys, ci, code):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(browser, "install_commands", lambda euid: [["false"]])
    assert browser.install() == code
    assert "chromium`" in capsys.readouterr().err


def test_install_leaves_a_wrong_chromium_to_the_user(monkeypatch, capsys):
    monkeypatch.setenv("CHROMIUM", "/nowhere/chrome")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(browser, "install_commands", lambda euid: pytest.fail("nothing to install"))
    assert browser.install() == 0
    assert "/nowhere/chrome is not an executable file" in capsys.readouterr().err
