#!/usr/bin/env bash
# Install (or upgrade) the edge agent on a store box (Debian, Raspberry Pi OS), as root.
#
#   sudo deploy/install.sh --store-id ID [--sync-url URL --token-file FILE] PACKAGE
#                                         PACKAGE: a wheel (edge_agent-*.whl) or a source tree
#   sudo deploy/install.sh --rollback     switch back to the previously installed version
#
# What it does, each step idempotent (run it again to upgrade):
#   1. the system user edge-agent (group edge-agent, also in dialout for serial devices);
#   2. /etc/edge-agent (config), /var/lib/edge-agent (buffer, models), /opt/edge-agent (code);
#   3. the config: /etc/edge-agent/agent.toml from deploy/agent.toml only if there is none
#      (an existing config is never overwritten); agent.toml.example is always refreshed;
#      --store-id and --sync-url go to the drop-ins /etc/edge-agent/conf.d/50-store-id.toml
#      and 50-sync-url.toml (each rewritten when its option is given; conf.d/*.toml are
#      merged over agent.toml in name order, a later file winning);
#      secrets are systemd credentials, one 0600 root file each in
#      /etc/edge-agent/credentials/ (sync-token from --token-file; mqtt-password and
#      pseudonym-key to fill in by hand; an empty file means "not set"), which the unit
#      hands to the agent with LoadCredential= (never Environment=). The store id must be
#      set and must not be the example's store-001: the install stops before the service
#      starts with it;
#   4. a new venv /opt/edge-agent/venvs/<time> with the package and its dependencies; it is
#      checked (edge-agent --version; check-config on the installed config, with the unit's
#      Environment= such as a token kept in a drop-in) before /opt/edge-agent/venv (a
#      symlink, what the unit runs) is switched to it, so a failed install leaves the
#      running version alone. pip and setuptools are then removed from it (the service
#      never uses them). The previous venv is kept for --rollback;
#   5. the unit /etc/systemd/system/edge-agent.service, `systemctl daemon-reload`,
#      `systemctl enable --now edge-agent`, and on an upgrade `systemctl try-restart`.
#
# Options:
#   --root DIR      install under DIR instead of / (also: DESTDIR=DIR). For tests: the venv
#                   is not relocatable, so a tree built this way runs only at DIR.
#   --no-system     skip the commands that change the system outside the tree (getent,
#                   useradd, chown, systemctl); the default under --root DIR
#                   (also: EDGE_AGENT_INSTALL_SYSTEM=0)
#   --system        run them even under --root DIR (tests put recording fakes on PATH)
#                   (also: EDGE_AGENT_INSTALL_SYSTEM=1)
#   --python PY     the interpreter the venv is made from (default: python3, 3.11 or newer)
#   --system-site-packages   let the venv see the interpreter's packages (e.g. Debian's
#                   python3-numpy instead of a build on a small box)
#   --no-deps       install the package only, not its dependencies (they must be visible
#                   some other way: --system-site-packages, PYTHONPATH)
#   --rollback      point /opt/edge-agent/venv back at the previous venv and restart
#   --store-id ID   this store's id (agent.store_id); required unless the installed config
#                   already sets one other than the example's store-001
#   --sync-url URL  the central customer store (sync.url)
#   --with EXTRA    also install the package's extra EXTRA (repeatable): awscrt (the faster
#                   MQTT 5 client, 13 MB; [mqtt] client = "auto" picks it once installed)
#                   or nats (sync.transport = "nats")
#   --token-file FILE   this store's sync token (`customer-store token create --store ID`),
#                   copied to /etc/edge-agent/credentials/sync-token
#
# The system commands are looked up on PATH, and those that change something run through
# one function (`system`), so a test can stand recording fakes in for them; the queries
# (getent, systemctl show) are skipped with them. Nothing else outside ROOT is changed
# (pip's download cache aside).
set -Eeuo pipefail

readonly SERVICE=edge-agent
readonly USER_NAME=edge-agent
readonly EXAMPLE_STORE_ID=store-001
readonly CREDENTIALS=(sync-token mqtt-password pseudonym-key)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

root=${DESTDIR:-}
system_mode=${EDGE_AGENT_INSTALL_SYSTEM:-}
python=${PYTHON:-python3}
venv_args=()
with_deps=1
rollback=0
package=""
store_id=""
store_id_given=0
sync_url=""
token_file=""
extras=()

die() {
    echo "install.sh: $*" >&2
    exit 1
}
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; root=$2; shift 2 ;;
        --root=*) root=${1#--root=}; shift ;;
        --system) system_mode=1; shift ;;
        --no-system) system_mode=0; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; python=$2; shift 2 ;;
        --system-site-packages) venv_args+=(--system-site-packages); shift ;;
        --no-deps) with_deps=0; shift ;;
        --rollback) rollback=1; shift ;;
        --with) [ $# -ge 2 ] || die "--with needs an extra (awscrt, nats)"; extras+=("$2"); shift 2 ;;
        --with=*) extras+=("${1#--with=}"); shift ;;
        --store-id) [ $# -ge 2 ] || die "--store-id needs an id"; store_id=$2; store_id_given=1; shift 2 ;;
        --store-id=*) store_id=${1#--store-id=}; store_id_given=1; shift ;;
        --sync-url) [ $# -ge 2 ] || die "--sync-url needs a url"; sync_url=$2; shift 2 ;;
        --sync-url=*) sync_url=${1#--sync-url=}; shift ;;
        --token-file) [ $# -ge 2 ] || die "--token-file needs a file"; token_file=$2; shift 2 ;;
        --token-file=*) token_file=${1#--token-file=}; shift ;;
        -h | --help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$package" ] || die "one package only"; package=$1; shift ;;
    esac
done

for extra in "${extras[@]}"; do
    [[ "$extra" =~ ^(awscrt|nats)$ ]] || die "--with $extra: the store box's extras are awscrt and nats"
done
root=${root%/}  # "" is the real /
if [ -n "$root" ]; then
    [ -d "$root" ] || die "--root $root is not a directory"
    root=$(cd "$root" && pwd)
fi
if [ -z "$system_mode" ]; then
    if [ -z "$root" ]; then system_mode=1; else system_mode=0; fi
fi
if [ "$rollback" = 0 ] && [ -z "$package" ]; then
    die "usage: install.sh [options] PACKAGE (a wheel or a source tree) | install.sh --rollback"
fi
if [ "$store_id_given" = 1 ]; then
    [ -n "$store_id" ] || die "--store-id is empty: give this store's id"
    [ "$store_id" != "$EXAMPLE_STORE_ID" ] ||
        die "--store-id $EXAMPLE_STORE_ID is the example's id: give this store's own id"
    [[ "$store_id" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] ||
        die "--store-id $store_id: letters, digits, '.', '_', '-' only (at most 64)"
fi
if [ -n "$sync_url" ]; then
    [[ "$sync_url" =~ ^https?://[^[:space:]\"]+$ ]] || die "--sync-url $sync_url is not an http(s) url"
fi
if [ -n "$token_file" ]; then
    [ -f "$token_file" ] && [ -r "$token_file" ] || die "--token-file $token_file: no such readable file"
    [ -n "$(tr -d '[:space:]' <"$token_file")" ] || die "--token-file $token_file is empty"
fi
if [ -z "$root" ] && [ "$system_mode" = 1 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo), or use --root DIR --no-system for a trial"
fi

# The one way system-changing commands run: skipped with --no-system.
system() {
    if [ "$system_mode" = 1 ]; then
        "$@"
    else
        say "skipped (--no-system): $*"
    fi
}

etc_dir=$root/etc/edge-agent
dropin_dir=$etc_dir/conf.d
credentials_dir=$etc_dir/credentials
state_dir=$root/var/lib/edge-agent
opt_dir=$root/opt/edge-agent
venvs_dir=$opt_dir/venvs
current_link=$opt_dir/venv
unit_path=$root/etc/systemd/system/$SERVICE.service

# A first install must name its store: the example config's store-001 must never go live.
if [ "$rollback" = 0 ] && [ "$store_id_given" = 0 ] && [ ! -e "$etc_dir/agent.toml" ]; then
    die "first install: give this store's id with --store-id ID (the example's $EXAMPLE_STORE_ID is refused)"
fi

# The venv /opt/edge-agent/venv points at now ("" when none).
current_venv() {
    if [ -L "$current_link" ]; then
        basename "$(readlink "$current_link")"
    elif [ -e "$current_link" ]; then
        die "$current_link is not a symlink (installed by other means?): move it away first"
    fi
}

# The Environment= of the unit and its drop-ins (e.g. EDGE_AGENT__SYNC__TOKEN), so that the
# config is checked as the service will see it. Values are words without spaces.
service_environment() {
    if [ "$system_mode" = 1 ]; then
        systemctl show --property=Environment --value "$SERVICE" 2>/dev/null || true
    fi
}

# Check a venv against the installed config (its drop-ins and credentials too) before it
# goes live; a config that names no store, or the example's, is refused.
check_venv() {
    local venv=$1 environment=() checked
    "$venvs_dir/$venv/bin/edge-agent" --version >/dev/null || return 1
    if [ -f "$etc_dir/agent.toml" ]; then
        read -r -a environment <<<"$(service_environment)" || true
        checked=$(env "${environment[@]}" CREDENTIALS_DIRECTORY="$credentials_dir" \
            "$venvs_dir/$venv/bin/edge-agent" check-config --config "$etc_dir/agent.toml") ||
            return 1
        echo "$checked"
        case "$checked" in
            *"store_id=$EXAMPLE_STORE_ID "*)
                echo "install.sh: agent.store_id is the example's $EXAMPLE_STORE_ID:" \
                    "give this store's id with --store-id ID" >&2
                return 1 ;;
        esac
    fi
}

# Atomically point /opt/edge-agent/venv at venvs/NAME.
switch_to() {
    ln -sfn "venvs/$1" "$current_link.new"
    mv -T "$current_link.new" "$current_link"
    say "active: $venvs_dir/$1"
}

restart_if_running() {
    system systemctl daemon-reload
    system systemctl try-restart "$SERVICE"
}

if [ "$rollback" = 1 ]; then
    active=$(current_venv)
    [ -n "$active" ] || die "nothing installed under $opt_dir"
    previous=""
    for candidate in "$venvs_dir"/*/; do
        name=$(basename "$candidate")
        if [ "$name" != "$active" ] && [ -x "$venvs_dir/$name/bin/edge-agent" ]; then
            previous=$name
        fi
    done
    [ -n "$previous" ] || die "no previous version to roll back to in $venvs_dir"
    check_venv "$previous" || die "the previous version ($previous) rejects the config"
    switch_to "$previous"
    restart_if_running
    say "rolled back from $active to $previous"
    exit 0
fi

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$python is not Python 3.11 or newer"
"$python" -c 'import ensurepip, venv' 2>/dev/null ||
    die "$python cannot make a venv: apt install python3-venv"
if [ -d "$package" ]; then
    [ -f "$package/pyproject.toml" ] || die "$package has no pyproject.toml"
    package=$(cd "$package" && pwd)
elif [ -f "$package" ]; then
    case "$package" in *.whl) ;; *) die "$package is not a wheel (.whl)" ;; esac
    package=$(cd "$(dirname "$package")" && pwd)/$(basename "$package")
else
    die "$package: no such wheel or source tree"
fi

# 1. The user: a system account without a login, in dialout for the serial lines.
if [ "$system_mode" = 0 ] || ! getent passwd "$USER_NAME" >/dev/null; then
    system useradd --system --user-group --groups dialout --no-create-home \
        --home-dir /var/lib/edge-agent --shell /usr/sbin/nologin "$USER_NAME"
fi

# 2. The directories: code read-only for the agent, state its own, config readable by it.
install -d -m 0755 "$opt_dir" "$venvs_dir" "$root/etc/systemd/system"
install -d -m 0750 "$etc_dir" "$state_dir"
system chown "root:$USER_NAME" "$etc_dir"
system chown "$USER_NAME:$USER_NAME" "$state_dir"

# 3. The config: the example always, the live file only once (it may hold a token).
install -m 0640 "$here/agent.toml" "$etc_dir/agent.toml.example"
if [ -e "$etc_dir/agent.toml" ]; then
    say "kept $etc_dir/agent.toml (compare with agent.toml.example after an upgrade)"
else
    install -m 0640 "$here/agent.toml" "$etc_dir/agent.toml"
    say "installed $etc_dir/agent.toml: set agent.store_id (and [sync], [[serial.ports]])"
fi
system chown "root:$USER_NAME" "$etc_dir/agent.toml" "$etc_dir/agent.toml.example"
# One drop-in per option, rewritten only when that option is given, so an upgrade that
# names only --sync-url keeps the store id of the first install.
write_dropin() {
    local name=$1 content=$2
    install -d -m 0750 "$dropin_dir"
    system chown "root:$USER_NAME" "$dropin_dir"
    printf '# Written by install.sh (%s); merged over agent.toml, conf.d/*.toml in name order.\n%s\n' \
        "$name" "$content" >"$dropin_dir/$name.new"
    chmod 0640 "$dropin_dir/$name.new"
    mv -f "$dropin_dir/$name.new" "$dropin_dir/$name"
    system chown "root:$USER_NAME" "$dropin_dir/$name"
    say "wrote $dropin_dir/$name"
}
if [ "$store_id_given" = 1 ]; then
    write_dropin 50-store-id.toml "$(printf '[agent]\nstore_id = "%s"' "$store_id")"
fi
if [ -n "$sync_url" ]; then
    write_dropin 50-sync-url.toml "$(printf '[sync]\nurl = "%s"' "$sync_url")"
fi
# Secrets: systemd reads these as root and hands them to the agent (LoadCredential=); the
# unit needs every file to exist, so the ones not given are created empty ("not set").
install -d -m 0700 "$credentials_dir"
for name in "${CREDENTIALS[@]}"; do
    if [ ! -e "$credentials_dir/$name" ]; then
        install -m 0600 /dev/null "$credentials_dir/$name"
    fi
done
if [ -n "$token_file" ]; then
    install -m 0600 "$token_file" "$credentials_dir/sync-token"
    say "installed the sync token as $credentials_dir/sync-token"
fi
system chown -R root:root "$credentials_dir"

# 4. A fresh venv; the live one is switched only once the new one passes its checks.
previous=$(current_venv)
new_venv=$(basename "$(mktemp -d "$venvs_dir/$(date -u +%Y%m%dT%H%M%SZ).XXXX")")
cleanup_failed() {
    rm -rf "${venvs_dir:?}/$new_venv"
    echo "install.sh: failed; ${previous:-nothing} is still the active version" >&2
}
trap cleanup_failed ERR
chmod 0755 "$venvs_dir/$new_venv"
say "creating $venvs_dir/$new_venv"
"$python" -m venv "${venv_args[@]}" "$venvs_dir/$new_venv"
pip=("$venvs_dir/$new_venv/bin/python" -m pip --quiet --disable-pip-version-check)
if [ "$with_deps" = 1 ]; then
    requirement=$package
    if [ "${#extras[@]}" -gt 0 ]; then
        requirement="$package[$(IFS=,; echo "${extras[*]}")]"
    fi
    "${pip[@]}" install "$requirement"
fi
# Always this exact package, even when the version number is the one already installed.
"${pip[@]}" install --no-deps --force-reinstall "$package"
check_venv "$new_venv"
# The service never runs pip or setuptools (27 MB); every install makes a fresh venv, so
# the live one does without them (`python -m ensurepip` puts pip back for a look inside).
env -u PYTHONPATH "${pip[@]}" uninstall --yes setuptools pip
trap - ERR
switch_to "$new_venv"
for doc in "$here/../README.md" "$here/../docs/operations.md"; do
    if [ -f "$doc" ]; then install -m 0644 "$doc" "$opt_dir/"; fi
done
# Keep the active and the previous venv (for --rollback), nothing older.
for old in "$venvs_dir"/*/; do
    name=$(basename "$old")
    if [ "$name" != "$new_venv" ] && [ "$name" != "$previous" ]; then
        rm -rf "${venvs_dir:?}/$name"
    fi
done

# 5. The service.
install -m 0644 "$here/$SERVICE.service" "$unit_path"
system systemctl daemon-reload
system systemctl enable --now "$SERVICE"
if [ -n "$previous" ]; then
    system systemctl try-restart "$SERVICE"  # enable --now leaves a running old version
fi
version=$("$venvs_dir/$new_venv/bin/edge-agent" --version)
say "edge-agent $version installed${previous:+ (previous: $previous, for --rollback)}"
say "status: systemctl status $SERVICE; edge-agent status; journalctl -u $SERVICE"
