#!/usr/bin/env bash
# Development SAML 2.0 Identity Provider for Vigil's SAML login tests (Vigil is the SP):
# Debian's SimpleSAMLphp 1.19 served by PHP's built-in web server on loopback. No Apache, no Docker.
#
#   deploy/dev/saml/idp.sh install                          (root: apt packages, idempotent)
#   deploy/dev/saml/idp.sh start DIR PORT SP_METADATA_FILE  (prints the IdP metadata URL)
#   deploy/dev/saml/idp.sh stop DIR
#
# `start` writes a self-contained SimpleSAMLphp configuration into DIR (config.php,
# authsources.php, metadata/saml20-idp-hosted.php, metadata/saml20-sp-remote.php), the IdP's
# signing key and self-signed certificate (idp.key, idp.crt: made once, kept across restarts),
# random secrets (secrets.php: secret salt and admin password, made once), a router script for
# PHP's built-in server (router.php), and starts
#   php -S 127.0.0.1:PORT -t /usr/share/simplesamlphp/www DIR/router.php
# with SIMPLESAMLPHP_CONFIG_DIR=DIR, in its own session, logging to DIR/idp.log, PID in
# DIR/idp.pid. It returns once the metadata URL answers. When an IdP from this DIR already runs
# on the same PORT it is kept (SimpleSAMLphp rereads its configuration and metadata on every
# request, so the rewritten files take effect at once); on another port it is restarted.
#
# SP_METADATA_FILE is the SP's SAML 2.0 metadata (an EntityDescriptor or EntitiesDescriptor XML
# document, converted with SimpleSAMLphp's own metadata parser), or a ready SimpleSAMLphp PHP
# file that fills $metadata[...] for the saml20-sp-remote set (copied as is). Whatever the SP's
# metadata says, the IdP signs both the Response and the Assertion with RSA-SHA256, encrypts
# nothing, releases every attribute, and names attributes with the `basic` NameFormat.
#
# URLs (base http://127.0.0.1:PORT/simplesaml/):
#   entity id and metadata  http://127.0.0.1:PORT/simplesaml/saml2/idp/metadata.php
#   SSO (HTTP-Redirect and HTTP-POST)  http://127.0.0.1:PORT/simplesaml/saml2/idp/SSOService.php
#   SLO                     http://127.0.0.1:PORT/simplesaml/saml2/idp/SingleLogoutService.php
# Users (password `dev` for all): alice, bob, dave, agent-saml. See README.md.
set -euo pipefail

ssp_root=/usr/share/simplesamlphp
ssp_www="$ssp_root/www"
base_path=simplesaml   # URL path prefix of SimpleSAMLphp

log() { printf 'idp.sh: %s\n' "$*" >&2; }
die() { printf 'idp.sh: ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
  cat >&2 <<EOF
usage: $0 install
       $0 start DIR PORT SP_METADATA_FILE
       $0 stop DIR
EOF
  exit 2
}

show_log() { # file [lines]
  if [[ -f "$1" ]]; then
    printf -- '----- last lines of %s -----\n' "$1" >&2
    tail -n "${2:-40}" "$1" >&2 || true
    printf -- '----- end of %s -----\n' "$1" >&2
  fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# alive = exists and is not a zombie
proc_alive() {
  local state
  state="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

# ---------------------------------------------------------------------------- install
cmd_install() {
  [[ "$(id -u)" == 0 ]] || die "run as root (it installs apt packages)"
  command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian 12"
  # simplesamlphp: the IdP (its Depends pull in apache2 and libapache2-mod-php, which this
  # script does not use, but not php-xml, which it needs: DOM, SimpleXML); php-cli: `php -S`;
  # php-mbstring: used by SimpleSAMLphp; xmlsec1: check.py verifies signatures with it;
  # openssl: the IdP's key and certificate; curl: the readiness probe; python3: check.py.
  local want=(simplesamlphp php-cli php-xml php-mbstring xmlsec1 openssl curl python3) missing=() pkg
  for pkg in "${want[@]}"; do
    installed "$pkg" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || die "apt-get update failed"
    apt-get install -y -q "${missing[@]}" || die "apt-get install ${missing[*]} failed"
  else
    log "apt packages already installed"
  fi
  [[ -f "$ssp_www/saml2/idp/SSOService.php" ]] || die "$ssp_www/saml2/idp/SSOService.php missing (package simplesamlphp)"
  command -v php >/dev/null || die "php not found (package php-cli)"
}

# ---------------------------------------------------------------------------- state
# set by set_dir: absolute paths of everything in DIR
set_dir() {
  [[ -n "$1" ]] || die "DIR is empty"
  mkdir -p "$1"
  dir="$(cd "$1" && pwd)"
  pidfile="$dir/idp.pid"
  portfile="$dir/idp.port"
  logfile="$dir/idp.log"
}

idp_pid() { [[ -f "$pidfile" ]] && cat "$pidfile"; }

# our php -S, for this DIR (the router path is in its command line)
idp_alive() {
  local pid
  pid="$(idp_pid 2>/dev/null)" || return 1
  [[ -n "$pid" ]] && proc_alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$dir/router.php"
}

metadata_url() { printf 'http://127.0.0.1:%s/%s/saml2/idp/metadata.php\n' "$1" "$base_path"; }

# ready = the metadata URL answers with this DIR's certificate (not some other server's)
idp_ready() { # port
  local md cert
  md="$(curl -fsS -m 5 "$(metadata_url "$1")" 2>/dev/null)" || return 1
  cert="$(sed '/-----/d' "$dir/idp.crt" | tr -d '\n')"
  [[ -n "$cert" ]] && tr -d ' \n' <<<"$md" | grep -qF -- "$cert"
}

port_in_use() { # port
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# ---------------------------------------------------------------------------- configuration
write_secrets() {
  [[ -f "$dir/secrets.php" ]] && return 0
  local salt admin
  salt="$(openssl rand -hex 32)"
  admin="$(openssl rand -hex 12)"
  (umask 077
   cat >"$dir/secrets.php.tmp" <<EOF
<?php
// Generated once by deploy/dev/saml/idp.sh. admin_password logs into /${base_path}/admin (user admin).
return [
    'secretsalt' => '$salt',
    'admin_password' => '$admin',
];
EOF
  )
  mv "$dir/secrets.php.tmp" "$dir/secrets.php"
}

write_key() {
  [[ -f "$dir/idp.key" && -f "$dir/idp.crt" ]] && return 0
  log "generating the IdP's RSA 2048 signing key and self-signed certificate in $dir"
  (umask 077
   openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
     -subj "/CN=Vigil dev SAML IdP" -keyout "$dir/idp.key.tmp" -out "$dir/idp.crt.tmp" \
     >"$dir/openssl.log" 2>&1) || { show_log "$dir/openssl.log"; die "openssl req failed"; }
  chmod 644 "$dir/idp.crt.tmp"
  mv "$dir/idp.key.tmp" "$dir/idp.key"
  mv "$dir/idp.crt.tmp" "$dir/idp.crt"
}

write_config() { # port
  local port="$1"
  mkdir -p "$dir/metadata" "$dir/sessions" "$dir/tmp" "$dir/data"
  chmod 700 "$dir/sessions"

  cat >"$dir/config.php" <<EOF
<?php
// SimpleSAMLphp 1.19 configuration of Vigil's dev SAML IdP. Written by deploy/dev/saml/idp.sh
// (rewritten on every start). Everything it uses lives in this directory.
\$dir = __DIR__;
\$secrets = require \$dir . '/secrets.php';

\$config = [
    // Absolute base URL: the entity id and every endpoint are the same whatever Host header a
    // client sends (127.0.0.1 vs localhost).
    'baseurlpath' => 'http://127.0.0.1:${port}/${base_path}/',
    'certdir' => \$dir . '/',
    'loggingdir' => \$dir . '/',
    'datadir' => \$dir . '/data/',
    'tempdir' => \$dir . '/tmp',
    'metadatadir' => \$dir . '/metadata/',
    'metadata.sources' => [
        ['type' => 'flatfile', 'directory' => \$dir . '/metadata'],
    ],

    'technicalcontact_name' => 'Vigil dev',
    'technicalcontact_email' => 'vigil-dev@example.com',
    'timezone' => 'UTC',

    'secretsalt' => \$secrets['secretsalt'],
    'auth.adminpassword' => \$secrets['admin_password'],
    'admin.protectindexpage' => false,
    'admin.protectmetadata' => false,
    'admin.checkforupdates' => false,   // no network access
    'trusted.url.domains' => ['127.0.0.1', 'localhost'],

    'debug' => ['saml' => false, 'backtraces' => true, 'validatexml' => false],
    'showerrors' => true,
    'errorreporting' => false,
    'production' => false,

    // SimpleSAMLphp's own log goes to stderr, i.e. idp.log beside PHP's access log
    'logging.level' => SimpleSAML\Logger::INFO,
    'logging.handler' => 'stderr',
    'logging.processname' => 'vigil-dev-idp',
    'statistics.out' => [],

    'enable.saml20-idp' => true,
    'enable.shib13-idp' => false,
    'enable.adfs-idp' => false,

    'module.enable' => [
        'core' => true,
        'saml' => true,
        'admin' => true,
        'exampleauth' => true,
    ],

    // Sessions: PHP files in this directory. Plain HTTP on loopback, so no Secure cookies.
    'store.type' => 'phpsession',
    'session.phpsession.savepath' => \$dir . '/sessions',
    'session.phpsession.cookiename' => 'SimpleSAML',
    'session.phpsession.httponly' => true,
    'session.cookie.name' => 'SimpleSAMLSessionID',
    'session.authtoken.cookiename' => 'SimpleSAMLAuthToken',
    'session.cookie.path' => '/',
    'session.cookie.domain' => null,
    'session.cookie.secure' => false,
    'session.cookie.samesite' => null,
    'session.cookie.lifetime' => 0,
    'session.duration' => 60 * 60,          // 1 hour of IdP SSO session
    'session.datastore.timeout' => 60 * 60,
    'session.state.timeout' => 15 * 60,     // a login form (AuthState) is good for 15 minutes
    'session.rememberme.enable' => false,

    'language.available' => ['en'],
    'language.default' => 'en',
    'language.cookie.secure' => false,
    'language.cookie.samesite' => null,

    'theme.use' => 'default',
    'template.auto_reload' => false,

    'authproc.idp' => [],
    'authproc.sp' => [],
];
EOF

  cat >"$dir/authsources.php" <<'EOF'
<?php
// Test users of Vigil's dev SAML IdP (password `dev` for all). Written by deploy/dev/saml/idp.sh.
$config = [
    'admin' => ['core:AdminPassword'],

    'vigil-users' => [
        'exampleauth:UserPass',
        'alice:dev' => [
            'uid' => ['alice'],
            'mail' => ['alice@example.com'],
            'groups' => ['approvers', 'people'],
        ],
        'bob:dev' => [
            'uid' => ['bob'],
            'mail' => ['bob@example.com'],
            'groups' => ['people'],
        ],
        'dave:dev' => [
            'uid' => ['dave'],
            'mail' => ['dave@example.com'],
            'groups' => ['auditors'],
        ],
        'agent-saml:dev' => [
            'uid' => ['agent-saml'],
            'mail' => ['agent-saml@example.com'],
            'groups' => ['agents', 'dba'],
            'model' => ['gpt-5'],
            'agent' => ['true'],
        ],
    ],
];
EOF

  cat >"$dir/metadata/saml20-idp-hosted.php" <<EOF
<?php
// The IdP itself. Written by deploy/dev/saml/idp.sh.
\$metadata['http://127.0.0.1:${port}/${base_path}/saml2/idp/metadata.php'] = [
    'host' => '__DEFAULT__',
    'auth' => 'vigil-users',
    'privatekey' => dirname(__DIR__) . '/idp.key',
    'certificate' => dirname(__DIR__) . '/idp.crt',

    'SingleSignOnServiceBinding' => [
        'urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect',
        'urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST',
    ],
    'SingleLogoutServiceBinding' => [
        'urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect',
        'urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST',
    ],

    // The first format is the default: the NameID is the uid. An AuthnRequest whose
    // NameIDPolicy asks for one of the others gets it (emailAddress = mail, persistent = uid).
    'NameIDFormat' => [
        'urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified',
        'urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress',
        'urn:oasis:names:tc:SAML:2.0:nameid-format:persistent',
    ],
    'authproc' => [
        10 => ['class' => 'saml:AttributeNameID', 'attribute' => 'uid',
               'Format' => 'urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified'],
        11 => ['class' => 'saml:AttributeNameID', 'attribute' => 'mail',
               'Format' => 'urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress'],
        12 => ['class' => 'saml:AttributeNameID', 'attribute' => 'uid',
               'Format' => 'urn:oasis:names:tc:SAML:2.0:nameid-format:persistent'],
    ],
    'userid.attribute' => 'uid',

    'saml20.sign.response' => true,
    'saml20.sign.assertion' => true,
    'signature.algorithm' => 'http://www.w3.org/2001/04/xmldsig-more#rsa-sha256',
    'assertion.encryption' => false,
    'nameid.encryption' => false,
    'attributes.NameFormat' => 'urn:oasis:names:tc:SAML:2.0:attrname-format:basic',
    'assertion.lifetime' => 300,
];
EOF

  cat >"$dir/router.php" <<'EOF'
<?php
// Router for PHP's built-in web server (php -S 127.0.0.1:PORT -t SSP_WWW router.php): maps
// /simplesaml/SCRIPT.php/PATH/INFO?QUERY onto SimpleSAMLphp's www directory the way Apache's
// Alias does (SCRIPT_NAME, SCRIPT_FILENAME, PATH_INFO) and serves its static files.
// Written by deploy/dev/saml/idp.sh.

// Returns the PHP script to run, or null when the request has been answered.
function vigil_idp_route(string $www, string $prefix): ?string
{
    $notFound = function (): ?string {
        http_response_code(404);
        header('Content-Type: text/plain');
        echo "not found\n";
        return null;
    };
    $path = rawurldecode((string) parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH));
    if ($path === '/' || $path === $prefix) {
        header('Location: ' . $prefix . '/', true, 302);
        return null;
    }
    if (strncmp($path, $prefix . '/', strlen($prefix) + 1) !== 0) {
        return $notFound();
    }
    $segments = explode('/', substr($path, strlen($prefix) + 1));
    $file = $www;
    $scriptName = $prefix;
    $pathInfo = '';
    $n = count($segments);
    for ($i = 0; $i < $n; $i++) {
        $seg = $segments[$i];
        if ($seg === '' && $i === $n - 1) {
            break;  // trailing slash: a directory
        }
        if ($seg === '' || $seg === '.' || $seg === '..' || strpos($seg, "\0") !== false) {
            return $notFound();
        }
        $file .= '/' . $seg;
        $scriptName .= '/' . $seg;
        if (is_file($file)) {
            $rest = array_slice($segments, $i + 1);
            $pathInfo = count($rest) ? '/' . implode('/', $rest) : '';
            break;
        }
        if (!is_dir($file)) {
            return $notFound();
        }
    }
    if (is_dir($file)) {
        if (substr($path, -1) !== '/') {
            header('Location: ' . $path . '/', true, 301);
            return null;
        }
        $file .= '/index.php';
        $scriptName .= '/index.php';
        if (!is_file($file)) {
            return $notFound();
        }
    }

    if (substr($file, -4) !== '.php') {
        $types = [
            'css' => 'text/css', 'js' => 'application/javascript', 'png' => 'image/png',
            'gif' => 'image/gif', 'jpg' => 'image/jpeg', 'svg' => 'image/svg+xml',
            'ico' => 'image/x-icon', 'woff' => 'font/woff', 'woff2' => 'font/woff2',
            'ttf' => 'font/ttf', 'eot' => 'application/vnd.ms-fontobject', 'html' => 'text/html',
            'txt' => 'text/plain', 'json' => 'application/json', 'xml' => 'application/xml',
        ];
        $ext = strtolower(pathinfo($file, PATHINFO_EXTENSION));
        header('Content-Type: ' . ($types[$ext] ?? 'application/octet-stream'));
        header('Content-Length: ' . filesize($file));
        readfile($file);
        return null;
    }

    $_SERVER['SCRIPT_FILENAME'] = $file;
    $_SERVER['SCRIPT_NAME'] = $scriptName;
    $_SERVER['PHP_SELF'] = $scriptName . $pathInfo;
    if ($pathInfo !== '') {
        $_SERVER['PATH_INFO'] = $pathInfo;
    } else {
        unset($_SERVER['PATH_INFO']);
    }
    return $file;
}

$vigil_idp_script = vigil_idp_route('@SSP_WWW@', '/@BASE_PATH@');
if ($vigil_idp_script === null) {
    return true;
}
chdir(dirname($vigil_idp_script));
require $vigil_idp_script;
return true;
EOF
  sed -i -e "s|@SSP_WWW@|$ssp_www|g" -e "s|@BASE_PATH@|$base_path|g" "$dir/router.php"
}

# SP metadata: XML through SimpleSAMLphp's SAMLParser, or a PHP metadata file as is
write_sp_metadata() { # file
  local src="$1" out="$dir/metadata/saml20-sp-remote.php"
  [[ -f "$src" && -r "$src" ]] || die "SP metadata file $src not found"
  if head -c 64 "$src" | grep -q '^<?php'; then
    php -l "$src" >/dev/null 2>"$dir/sp-metadata.log" || { show_log "$dir/sp-metadata.log"; die "$src is not valid PHP"; }
    cp "$src" "$out.tmp"
    mv "$out.tmp" "$out"
    log "SP metadata: copied the PHP file $src"
    return 0
  fi
  cat >"$dir/sp-metadata-convert.php" <<'EOF'
<?php
// Converts SAML 2.0 SP metadata (XML) to SimpleSAMLphp's saml20-sp-remote PHP format, with the
// IdP-side policy of Vigil's dev IdP forced on. Written by deploy/dev/saml/idp.sh.
require '/usr/share/simplesamlphp/vendor/autoload.php';

$xml = file_get_contents($argv[1]);
if ($xml === false) {
    fwrite(STDERR, "cannot read $argv[1]\n");
    exit(1);
}
$entities = \SimpleSAML\Metadata\SAMLParser::parseDescriptorsString($xml);
$supported = [
    'urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified',
    'urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress',
    'urn:oasis:names:tc:SAML:2.0:nameid-format:persistent',
];
$out = "<?php\n// SP metadata converted from " . $argv[1] . " by deploy/dev/saml/idp.sh.\n";
$n = 0;
foreach ($entities as $entityId => $entity) {
    $m = $entity->getMetadata20SP();
    if ($m === null) {
        continue;
    }
    if (empty($m['AssertionConsumerService'])) {
        fwrite(STDERR, "SP $entityId has no AssertionConsumerService\n");
        exit(1);
    }
    // The SP's own NameIDFormat is kept when the IdP supplies it, else: unspecified (= uid).
    if (!isset($m['NameIDFormat']) || !in_array($m['NameIDFormat'], $supported, true)) {
        $m['NameIDFormat'] = $supported[0];
    }
    $m['saml20.sign.response'] = true;
    $m['saml20.sign.assertion'] = true;   // even if the SP says WantAssertionsSigned="false"
    $m['signature.algorithm'] = 'http://www.w3.org/2001/04/xmldsig-more#rsa-sha256';
    $m['assertion.encryption'] = false;
    $m['nameid.encryption'] = false;
    $m['attributes.NameFormat'] = 'urn:oasis:names:tc:SAML:2.0:attrname-format:basic';
    // release every attribute; no expiry from validUntil/cacheDuration in a dev IdP
    unset($m['attributes'], $m['attributes.required'], $m['expire']);
    $out .= '$metadata[' . var_export($entityId, true) . '] = ' . var_export($m, true) . ";\n";
    fwrite(STDOUT, $entityId . "\n");
    $n++;
}
if ($n === 0) {
    fwrite(STDERR, "no SAML 2.0 SP (SPSSODescriptor) in $argv[1]\n");
    exit(1);
}
file_put_contents($argv[2], $out);
EOF
  local ids
  ids="$(SIMPLESAMLPHP_CONFIG_DIR="$dir" php -d display_errors=stderr -d error_reporting='E_ALL & ~E_DEPRECATED' \
           "$dir/sp-metadata-convert.php" "$src" "$out.tmp" 2>"$dir/sp-metadata.log")" \
    || { show_log "$dir/sp-metadata.log"; die "cannot convert SP metadata $src"; }
  php -l "$out.tmp" >/dev/null 2>>"$dir/sp-metadata.log" || { show_log "$dir/sp-metadata.log"; die "converted SP metadata is not valid PHP"; }
  mv "$out.tmp" "$out"
  log "SP metadata registered: $(tr '\n' ' ' <<<"$ids")"
}

# ---------------------------------------------------------------------------- start / stop
stop_idp() {
  if idp_alive; then
    local pid _
    pid="$(idp_pid)"
    log "stopping the SAML IdP (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do proc_alive "$pid" || break; sleep 0.1; done
    if proc_alive "$pid"; then
      log "the SAML IdP did not exit on SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  else
    log "SAML IdP not running"
  fi
  rm -f "$pidfile" "$portfile"
}

cmd_start() { # DIR PORT SP_METADATA_FILE
  (($# == 3)) || usage
  local port="$2" sp_file="$3"
  [[ "$port" =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || die "bad PORT '$port'"
  [[ -f "$ssp_www/saml2/idp/SSOService.php" ]] || die "SimpleSAMLphp not found in $ssp_root: run '$0 install' (as root) first"
  command -v php >/dev/null || die "php not found: run '$0 install' (as root) first"
  command -v openssl >/dev/null || die "openssl not found"
  command -v curl >/dev/null || die "curl not found"
  sp_file="$(realpath -e -- "$sp_file" 2>/dev/null)" || die "SP metadata file $3 not found"
  set_dir "$1"

  write_secrets
  write_key
  write_config "$port"
  write_sp_metadata "$sp_file"

  if idp_alive; then
    if [[ "$(cat "$portfile" 2>/dev/null)" == "$port" ]] && idp_ready "$port"; then
      log "SAML IdP already running (pid $(idp_pid), port $port); configuration rewritten"
      metadata_url "$port"
      return 0
    fi
    stop_idp
  fi
  rm -f "$pidfile" "$portfile"
  ! port_in_use "$port" || die "127.0.0.1:$port is already in use by another process"

  log "starting the SAML IdP on 127.0.0.1:$port (log $logfile)"
  # setsid: own session, so it outlives the caller's process group. PHP's notices (SimpleSAMLphp
  # 1.19 on PHP 8.2 has deprecations) go to the log, never into responses.
  SIMPLESAMLPHP_CONFIG_DIR="$dir" setsid php \
    -d display_errors=0 -d log_errors=1 -d error_reporting='E_ALL & ~E_DEPRECATED & ~E_STRICT' \
    -d session.gc_probability=0 -d expose_php=0 \
    -S "127.0.0.1:$port" -t "$ssp_www" "$dir/router.php" </dev/null >>"$logfile" 2>&1 &
  local pid=$!
  printf '%s\n' "$pid" >"$pidfile"
  printf '%s\n' "$port" >"$portfile"

  local _ up=0
  for _ in $(seq 1 150); do
    proc_alive "$pid" || break
    if idp_ready "$port" && proc_alive "$pid"; then up=1; break; fi
    sleep 0.1
  done
  if ((!up)); then
    kill "$pid" 2>/dev/null || true
    rm -f "$pidfile" "$portfile"
    show_log "$logfile"
    die "the SAML IdP failed to start on 127.0.0.1:$port"
  fi
  log "SAML IdP ready (pid $pid)"
  metadata_url "$port"
}

cmd_stop() { # DIR
  (($# == 1)) || usage
  [[ -d "$1" ]] || { log "$1 does not exist: nothing to stop"; return 0; }
  set_dir "$1"
  stop_idp
}

case "${1:-}" in
  install) shift; (($# == 0)) || usage; cmd_install ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  *) usage ;;
esac
