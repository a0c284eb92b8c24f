"""TLS contexts (ssl, standard library only: lclusterc imports this too).

The daemon's TCP listener is HTTPS when lclusterd.conf sets tls_cert and
tls_key; with tls_client_ca it also asks every caller for a certificate signed
by that CA. Clients (lclusterc --server https://... --ca FILE, and the nodes
fetching each other's output) verify the server against a CA file, or the
system's CAs without one.

Every failure to load a file is one TLSError naming the file, meant for the
daemon's exit 78 (EX_CONFIG) and for one line of lclusterc.
"""

import ssl


class TLSError(Exception):
    """A certificate, key or CA file that cannot be used; one line naming it."""


def _readable(path, what):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TLSError(f"cannot read the TLS {what} {path}: {e.strerror}") from None
    if not data.strip():
        raise TLSError(f"the TLS {what} {path} is empty")
    return data


def _is_certificate(data):
    """Does data hold at least one PEM certificate that ssl can decode?"""
    text = data.decode("ascii", "replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    if begin not in text or end not in text:
        return False
    pem = text[text.index(begin):text.index(end) + len(end)]
    try:
        ssl.PEM_cert_to_DER_cert(pem)
    except ValueError:
        return False
    return True


def _load_chain(context, cert, key):
    data = _readable(cert, "certificate")
    _readable(key, "key")
    if not _is_certificate(data):
        raise TLSError(f"the TLS certificate {cert} is not a PEM certificate")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        text = str(e).lower()
        if "mismatch" in text:
            raise TLSError(f"the TLS key {key} does not match the certificate {cert}") from None
        if "key" in text or "pem" in text or "asn1" in text or "bad" in text:
            raise TLSError(f"the TLS key {key} is not a usable PEM private key "
                           f"({e.reason or e})") from None
        raise TLSError(f"the TLS certificate {cert} cannot be used ({e.reason or e})") from None


def _load_ca(context, ca, what):
    data = _readable(ca, what)
    if not _is_certificate(data):
        raise TLSError(f"the TLS {what} {ca} is not a PEM certificate")
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError as e:
        raise TLSError(f"the TLS {what} {ca} cannot be used ({e.reason or e})") from None


def server_context(cert, key, client_ca=None):
    """The TCP listener's context: its certificate chain and key; with
    client_ca, callers must present a certificate that CA signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key)
    if client_ca:
        _load_ca(context, client_ca, "client CA")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca=None, cert=None, key=None):
    """A context that verifies the server (and its name) against ca, or the
    system's CAs when ca is None; cert/key: our client certificate, for a
    listener with tls_client_ca."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        _load_ca(context, ca, "CA")
    if cert:
        _load_chain(context, cert, key or cert)
    return context


def describe(error, where, ca=None):
    """One line for a failed handshake with where (a URL)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        why = error.verify_message or error.reason or "certificate verify failed"
        trust = f"the CA {ca}" if ca else "the system's CAs (give the cluster's CA with --ca)"
        return f"the TLS certificate of {where} is not trusted by {trust}: {why}"
    reason = getattr(error, "reason", None) or str(error) or type(error).__name__
    return f"TLS handshake with {where} failed: {reason}"
