# shellcheck shell=bash
# A kubeconfig that authenticates with a client certificate, everything embedded.

# kubeconfig_write FILE SERVER USER CA_FILE CERT_FILE KEY_FILE
kubeconfig_write() {
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: svcplane
  cluster:
    server: $2
    certificate-authority-data: $(base64 -w0 < "$4")
users:
- name: $3
  user:
    client-certificate-data: $(base64 -w0 < "$5")
    client-key-data: $(base64 -w0 < "$6")
contexts:
- name: svcplane
  context: {cluster: svcplane, user: $3}
current-context: svcplane
EOF
}
