"""The CA process (`meshproxy ca ...`): holds the CA keys and issues X.509-SVIDs for tokens.

It runs apart from the sidecars so that CA keys never live in a proxy's address space;
nothing on the data path imports this package. Sidecars reach it over HTTPS
(proxy.identity.request_svid).
"""
