#!/usr/bin/env bash
# Start a private lamina swarm on this machine: make (or reuse) its swarm key and a persistent
# identity in DIR, run `lamina-bootstrap` with them in the foreground (Ctrl-C stops it), and say
# what the other machines need: the swarm.key file and the --initial-peers address.
# See docs/private-swarm.md for the whole walk-through.
#
# Usage: scripts/new-swarm.sh [--port PORT] [--dir DIR] [--public-ip IP] [-- BOOTSTRAP_ARGS...]
set -euo pipefail

PROG=new-swarm.sh

usage() {
    cat <<'EOF'
Usage: scripts/new-swarm.sh [--port PORT] [--dir DIR] [--public-ip IP] [-- BOOTSTRAP_ARGS...]

Start a private lamina swarm: a bootstrap peer and relay (lamina-bootstrap, no model) with a
swarm key and a persistent identity kept in DIR, in the foreground; Ctrl-C stops it.

  --port PORT      TCP port to listen on, on every interface (default: 31337)
  --dir DIR        where swarm.key and identity.key are kept (default: ./lamina-swarm);
                   a DIR that holds them already is reused: same key, same peer id, same address
  --public-ip IP   the IPv4 address other machines reach this one at (a public IP, or the router's
                   when PORT is forwarded here); announced instead of this machine's own
                   addresses
  -- ARGS...       passed on to lamina-bootstrap (e.g. -- --initial-peers ADDR of another
                   bootstrap peer of the same swarm, or -- --log-level DEBUG)
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

port=31337
dir=./lamina-swarm
public_ip=""
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --port | --dir | --public-ip)
            [ $# -ge 2 ] || die "$1 needs a value (see --help)"
            case "$1" in
                --port) port=$2 ;;
                --dir) dir=$2 ;;
                --public-ip) public_ip=$2 ;;
            esac
            shift 2
            ;;
        --port=*) port=${1#*=}; shift ;;
        --dir=*) dir=${1#*=}; shift ;;
        --public-ip=*) public_ip=${1#*=}; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

if ! [[ $port =~ ^[0-9]{1,5}$ ]] || [ "$((10#$port))" -lt 1 ] || [ "$((10#$port))" -gt 65535 ]; then
    die "--port must be a TCP port number in [1, 65535], not '$port'"
fi
port=$((10#$port))
[ -n "$dir" ] || die "--dir must not be empty"

for tool in lamina-bootstrap lamina-swarm-key; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "$tool not found: lamina is not installed (run scripts/install.sh, or pip install -e . in the repository)"
done

# libp2p listens with SO_REUSEPORT (for hole punching), so a second listener on a port in use
# would seem to start fine and take a share of the connections: refuse a port that answers.
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "TCP port $port is already in use on this machine (another lamina-bootstrap or run-node?); stop it or pick another --port"
fi

announce=()
if [ -n "$public_ip" ]; then
    [[ $public_ip =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || die "--public-ip must be an IPv4 address, not '$public_ip'"
    IFS=. read -r a b c d <<<"$public_ip"
    for octet in "$a" "$b" "$c" "$d"; do
        [ "$((10#$octet))" -le 255 ] || die "--public-ip must be an IPv4 address, not '$public_ip'"
    done
    announce=(--announce-addr "/ip4/$public_ip/tcp/$port")
fi

# --- the swarm key and the identity ---------------------------------------------------------
trap 'echo "$PROG: interrupted" >&2; exit 130' INT TERM HUP
if [ ! -d "$dir" ]; then
    { mkdir -p -- "$dir" && chmod 700 -- "$dir"; } || die "cannot create $dir"
fi
dir=$(cd "$dir" && pwd)
if [ ! -e "$dir/.gitignore" ]; then
    # run inside a git checkout, the key and the identity must never be committed
    printf '# secrets of a lamina swarm (new-swarm.sh): never commit them\n*\n' >"$dir/.gitignore"
fi
key="$dir/swarm.key"
identity="$dir/identity.key"
if [ -e "$key" ]; then
    [ -f "$key" ] || die "$key exists but is not a file"
    echo "reusing the swarm key $key" >&2
else
    lamina-swarm-key --out "$key" || die "could not write the swarm key to $key"
fi
if [ -e "$identity" ]; then
    echo "reusing the bootstrap identity $identity (same peer id, same address)" >&2
fi
# the key's short id, as run-node logs it ("private swarm: swarm key <fingerprint>"); optional
fingerprint=$(python3 -c 'import sys; from p2p import SwarmKey; print(SwarmKey.load(sys.argv[1]).fingerprint())' \
    "$key" 2>/dev/null) || fingerprint=""
key_note=""
if [ -n "$fingerprint" ]; then
    key_note="
   Its fingerprint is $fingerprint: run-node logs \"private swarm: swarm key $fingerprint\"."
fi

# --- the bootstrap, until Ctrl-C ------------------------------------------------------------------
# lamina-bootstrap prints one stdout line, "bootstrap at MULTIADDR...", once it serves (its log
# goes to stderr). `instructions` passes that line on and explains it.
instructions() {
    trap '' INT TERM HUP   # read to the end: the bootstrap's last lines
    local line addrs=() remote=() local_addrs=() addr
    while IFS= read -r line; do
        printf '%s\n' "$line"
        [[ $line == "bootstrap at "* ]] || continue
        read -r -a addrs <<<"${line#bootstrap at }"
        for addr in "${addrs[@]}"; do
            case "$addr" in
                /ip4/127.* | /ip6/::1/*) local_addrs+=("$addr") ;;
                *) remote+=("$addr") ;;
            esac
        done
        [ ${#remote[@]} -gt 0 ] || remote=("${local_addrs[@]}")
        printf '%s\n' "${remote[@]}" >"$dir/initial-peers"
        cat <<EOF

================================================================================
lamina private swarm: bootstrap running (Ctrl-C stops it)

1. Copy the swarm key to every machine of the swarm (nodes and clients), e.g.
     scp $key user@machine:swarm.key
   It is the swarm's shared secret: whoever has it can join. Keep it mode 0600.$key_note

2. Pass this bootstrap to run-node and to clients as --initial-peers
   (also written to $dir/initial-peers):
$(printf '     %s\n' "${remote[@]}")
EOF
        if [ -z "$public_ip" ]; then
            cat <<EOF
   These are this machine's own addresses: fine on its LAN. For machines elsewhere, forward
   TCP port $port to this machine and rerun with --public-ip YOUR_PUBLIC_IP.
EOF
        fi
        cat <<EOF

   Node:   run-node --num-blocks N --swarm-key swarm.key \\
                    --initial-peers ${remote[0]}
   Client: lamina-chat --swarm-key swarm.key --initial-peers ${remote[0]}
   (both use the embedded SmolLM2 unless given --model MODEL: the same on every machine)

Keep $identity on this machine only: it is this bootstrap's peer id.
================================================================================

EOF
    done
}

# Ctrl-C reaches the bootstrap from the terminal too; a SIGINT, SIGTERM or SIGHUP sent to this
# script alone is passed on as SIGTERM, so the bootstrap never outlives it.
boot=""
stopping=""
trap 'stopping=1; [ -z "$boot" ] || kill -TERM "$boot" 2>/dev/null || true' INT TERM HUP
exec 3> >(instructions)
reader=$!
lamina-bootstrap --listen "/ip4/0.0.0.0/tcp/$port" "${announce[@]}" --identity "$identity" --swarm-key "$key" \
    "${extra[@]}" >&3 &
boot=$!
exec 3>&-
if [ -n "$stopping" ]; then kill -TERM "$boot" 2>/dev/null || true; fi
while true; do
    status=0
    wait "$boot" || status=$?
    kill -0 "$boot" 2>/dev/null || break   # still running: a signal interrupted the wait
done
trap - INT TERM HUP
wait "$reader" 2>/dev/null || true          # the instructions' last lines
if [ -n "$stopping" ] && [ "$status" -gt 128 ]; then
    status=0   # killed by the signal that stopped us (before it could catch it, or a SIGHUP)
fi
if [ "$status" -ne 0 ]; then
    echo "$PROG: lamina-bootstrap exited with status $status (its error is above)" >&2
    exit "$status"
fi
echo "bootstrap stopped; rerun $0 --dir $dir${public_ip:+ --public-ip $public_ip} --port $port to start it again at the same address"
