"""Serve acme2certifier (PyPI) over TLS on 127.0.0.1 for tests; run with acme2certifier's python.

python a2c_runner.py CONFIG PORT TLS_CERT TLS_KEY
"""

import os
import ssl
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIServer, make_server

cfg, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["ACME_SRV_CONFIGFILE"] = cfg

from acme2certifier.share import acme2certifier_wsgi as wsgi  # noqa: E402


def app(environ, start_response):  # type: ignore[no-untyped-def]
    environ["HTTP_X_FORWARDED_PROTO"] = "https"  # URLs in the directory must say https
    return wsgi.application(environ, start_response)


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


server = make_server(
    "127.0.0.1", port, app, server_class=ThreadingServer, handler_class=wsgi.get_handler_cls()
)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
