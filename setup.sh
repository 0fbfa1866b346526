#!/usr/bin/env bash
# Installs what turbowg and its tests need on a fresh Debian machine (run as root).
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" != 0 ]; then echo "setup.sh: run as root (it installs Debian packages and creates TUN devices)" >&2; exit 1; fi
need=()
for pair in wireguard-go:wireguard-go wg:wireguard-tools iperf3:iperf3 ip:iproute2 ethtool:ethtool ps:procps ping:iputils-ping openssl:openssl nft:nftables pebble:pebble; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
# Headers for the optional C accelerators (turbowg/noise/_aead.c links libcrypto); without them pip still
# installs turbowg, on the pure-Python data path.
[ -f /usr/include/openssl/evp.h ] || need+=(libssl-dev)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    # No recommends: wireguard-tools recommends a kernel module package we neither need nor can load here.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test,bench]'
accel=$(python3 -c 'from turbowg.noise import transport; from turbowg.tun import fast; from turbowg.device import route; from turbowg.relay import fastpath; from turbowg.conn import recvmmsg; print("C" if all((transport.HAVE_C, fast.HAVE_C, route.HAVE_C, fastpath.HAVE_C, recvmmsg.HAVE_C)) else "pure Python (C extensions not built)")')
echo "setup.sh: turbowg installed ($(command -v turbowg)); data path: $accel"
if [ "$accel" != C ] && [ -n "${CI:-}" ] && [ "${CI:-}" != false ] && [ "${CI:-}" != 0 ] && [ -z "${TURBOWG_NO_C:-}" ]; then
    echo "setup.sh: CI run but the C extensions were not built (pip's build_ext failed: see its output above; needs gcc and libssl-dev); set TURBOWG_NO_C=1 for the pure-Python run" >&2
    exit 1
fi
