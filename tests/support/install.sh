# Shell functions for the scripts that set a Debian machine up: tests/run.sh and
# deploy/examples/demo.sh. Each installs only what is missing, so a machine that has
# everything needs neither root nor the network. Source this file after setting ROOT
# (the checkout) and PROGRAM (the name errors start with).

fail() {
    echo "$PROGRAM: $*" >&2
    exit 1
}

# install_missing_packages COMMAND=PACKAGE...
# apt-get installs each PACKAGE whose COMMAND is not on PATH, and python3-venv when
# python3 cannot make a virtualenv.
install_missing_packages() {
    local pair missing=()
    for pair in "$@"; do
        command -v "${pair%%=*}" >/dev/null || missing+=("${pair#*=}")
    done
    if ! command -v python3 >/dev/null; then
        missing+=(python3 python3-venv)
    elif ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        missing+=(python3-venv)
    fi
    [ ${#missing[@]} -gt 0 ] || return 0
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    [ "$(id -u)" = 0 ] || fail "run as root to apt-get install ${missing[*]}"
    echo "==> installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed (above); check /etc/apt/sources.list"
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 \
        "${missing[@]}" >/dev/null || fail "apt-get install ${missing[*]} failed (above)"
}

# install_project VENV [EXTRAS]
# The checkout (with EXTRAS, e.g. "[test]") installed in the virtualenv VENV, made if
# need be. It is installed again when the checkout's code or EXTRAS changed, or when
# what is installed does not run. It is run from outside the checkout: inside, the
# checkout's own twisted/plugins would stand in for a missing Twisted.
install_project() {
    local venv=$1 extras=${2:-} stamp source_copy
    stamp=$(cd "$ROOT" && {
        echo "$extras"
        find pyproject.toml setup.cfg spegel_tx twisted -type f \
            ! -name '*.pyc' ! -name dropin.cache | LC_ALL=C sort | xargs sha256sum
    } | sha256sum | cut -c1-64)
    mkdir -p "$venv"
    exec 9>"$venv/spegel-tx-install.lock"
    flock 9 # Two scripts started at once install once.
    if ! _project_runs "$venv" "$stamp"; then
        echo "==> installing spegel-tx$extras from $ROOT into $venv"
        if [ ! -x "$venv/bin/python" ]; then
            python3 -m venv "$venv" || fail "python3 -m venv $venv failed (above)"
        fi
        # Built from a copy: a build writes build/ and *.egg-info beside its sources.
        source_copy=$(mktemp -d)
        cp -r "$ROOT"/{pyproject.toml,setup.cfg,README.md,LICENSE,spegel_tx,twisted} "$source_copy"
        if ! "$venv/bin/python" -m pip install -qq --disable-pip-version-check \
            "$source_copy$extras"; then
            rm -rf "$source_copy"
            fail "pip install into $venv failed (above); it needs PyPI"
        fi
        rm -rf "$source_copy"
        echo "$stamp" >"$venv/spegel-tx-source"
        _project_runs "$venv" "$stamp" ||
            fail "the installed spegel-tx does not run: try $venv/bin/spegel-tx version"
    fi
    flock -u 9
    exec 9>&-
}

_project_runs() {
    local venv=$1 stamp=$2
    [ "$(cat "$venv/spegel-tx-source" 2>/dev/null)" = "$stamp" ] &&
        (cd / && env -u PYTHONPATH "$venv/bin/spegel-tx" version) >/dev/null 2>&1 &&
        (cd / && env -u PYTHONPATH "$venv/bin/python" -c \
            'import twisted.scripts.twistd, twisted.plugins.spegel_plugin') >/dev/null 2>&1
}
