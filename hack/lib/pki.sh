# shellcheck shell=bash
# Certificates for throwaway clusters: ECDSA P-256 keys (quick to make, and every Kubernetes
# component and etcd takes them), signed by CAs of the cluster's own. Files go to $PKI_DIR.

# pki_ca NAME CN  -> $PKI_DIR/NAME.{crt,key}
pki_ca() {
  local name=$1 cn=$2
  mkdir -p "$PKI_DIR"
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI_DIR/$name.key" 2>/dev/null &&
    openssl req -x509 -new -key "$PKI_DIR/$name.key" -subj "/CN=$cn" -days 30 -out "$PKI_DIR/$name.crt" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}

# pki_cert NAME SUBJECT EKU [SANS] [CA]  -> $PKI_DIR/NAME.{crt,key}, signed by CA (default: ca)
#   EKU: serverAuth, clientAuth or both (comma-separated); SANS: an openssl subjectAltName list.
pki_cert() {
  local name=$1 subj=$2 eku=$3 sans=${4:-} ca=${5:-ca}
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI_DIR/$name.key" 2>/dev/null &&
    openssl req -new -key "$PKI_DIR/$name.key" -subj "$subj" -out "$PKI_DIR/$name.csr" 2>/dev/null || return 1
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [ -z "$sans" ] || echo "subjectAltName=$sans"
  } > "$PKI_DIR/$name.ext"
  openssl x509 -req -in "$PKI_DIR/$name.csr" -CA "$PKI_DIR/$ca.crt" -CAkey "$PKI_DIR/$ca.key" -CAcreateserial \
    -days 30 -extfile "$PKI_DIR/$name.ext" -out "$PKI_DIR/$name.crt" 2>/dev/null || return 1
  rm -f "$PKI_DIR/$name.csr" "$PKI_DIR/$name.ext"
}

# pki_sa_keys: the service-account signing key pair, $PKI_DIR/sa.{key,pub}
pki_sa_keys() {
  openssl ecparam -name prime256v1 -genkey -noout -out "$PKI_DIR/sa.key" 2>/dev/null &&
    openssl ec -in "$PKI_DIR/sa.key" -pubout -out "$PKI_DIR/sa.pub" 2>/dev/null
}
