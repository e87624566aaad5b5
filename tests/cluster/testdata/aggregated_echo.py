"""A minimal aggregated API server for smoke.sh: proves APIService aggregation.

It serves one API group version, sim.paddock.test/v1, over TLS on 127.0.0.1,
and requires a client certificate signed by the front-proxy CA, which is what
kube-apiserver presents (--proxy-client-cert-file) when it proxies an
APIService request. GET /apis/sim.paddock.test/v1/whoami answers with the
identity that kube-apiserver forwarded in the X-Remote-* headers.

This is a test probe for the control plane's aggregation wiring, not the
KubeVirt/CDI simulator.

usage: aggregated_echo.py PORT SERVING_CERT SERVING_KEY FRONT_PROXY_CA
"""

import http.server
import json
import ssl
import sys

GROUP_VERSION = "sim.paddock.test/v1"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        peer = self.connection.getpeercert() or {}
        subject = dict(rdn[0] for rdn in peer.get("subject", ()))
        if self.path.startswith(f"/apis/{GROUP_VERSION}/whoami"):
            body = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Success",
                "message": json.dumps(
                    {
                        "proxyClientCN": subject.get("commonName"),
                        "user": self.headers.get("X-Remote-User"),
                        "groups": self.headers.get_all("X-Remote-Group") or [],
                    },
                    sort_keys=True,
                ),
            }
        elif self.path.split("?")[0] == f"/apis/{GROUP_VERSION}":
            body = {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": GROUP_VERSION,
                "resources": [
                    {"name": "whoami", "namespaced": False, "kind": "Status", "verbs": ["get"]}
                ],
            }
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        sys.stderr.write(f"{self.path} X-Remote-User={self.headers.get('X-Remote-User')}\n")


def main():
    port, cert, key, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
