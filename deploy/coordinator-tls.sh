#!/bin/sh
# deploy/coordinator-tls.sh DIR NAME=SANS [NAME=SANS ...]
#
# Certificates for TLS on the coordinator's gRPC port (docs/operations.md, "Coordinator TLS"),
# with openssl: a CA (DIR/ca.pem and DIR/ca.key, made once and kept when present) and, for each
# NAME, a key and a certificate signed by that CA (DIR/NAME.key, DIR/NAME.pem) that names SANS,
# in openssl's subjectAltName syntax, e.g.
#
#   deploy/coordinator-tls.sh /etc/vigil/tls coord-1=IP:10.0.3.11,DNS:coord-1.internal
#
# A member certificate must name the address the other members, the nodes and the operators
# reach the member at; it serves both sides of mutual TLS between members (server and client
# authentication). Gateway nodes and operators need only DIR/ca.pem. Keys are P-256, the
# certificates last 825 days. For development and small installations; an organisation's own
# CA works the same way.
set -eu
[ $# -ge 1 ] || { echo "usage: $0 DIR NAME=SANS [NAME=SANS ...]" >&2; exit 2; }
dir=$1
shift
mkdir -p "$dir"
umask 077
if [ ! -f "$dir/ca.pem" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 825 \
        -subj "/CN=vigil coordinator CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
for spec in "$@"; do
    name=${spec%%=*}
    sans=${spec#*=}
    case $spec in *=?*) ;; *) echo "$0: $spec: expected NAME=SANS" >&2; exit 2 ;; esac
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
        -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=$sans" >"$dir/$name.ext"
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days 825 -extfile "$dir/$name.ext" \
        -out "$dir/$name.pem" 2>/dev/null
    rm -f "$dir/$name.csr" "$dir/$name.ext"
done
# The CA certificate is public; everything else stays readable by its owner only.
chmod 644 "$dir/ca.pem"
