"""Config errors: each names its field path and the problem in plain words, all at once."""
import pytest

from proxy.config import ConfigError, FieldError, load_config, parse_config

VALID = """
node: {id: web-1}
admin: {address: 127.0.0.1:15000}
workers: 2
listeners:
  - name: http-in
    address: 127.0.0.1:8080
    protocol: http
    routes:
      - name: api
        match: {prefix: /api}
        split: [{cluster: api-v1, weight: 90}, {cluster: api-v2, weight: 10}]
      - name: default
        match: {prefix: /}
        cluster: web
  - name: db
    address: 127.0.0.1:15432
    protocol: tcp
    cluster: postgres
clusters:
  - {name: web, endpoints: [127.0.0.1:9001, 127.0.0.1:9002]}
  - {name: api-v1, endpoints: [127.0.0.1:9101]}
  - {name: api-v2, endpoints: [127.0.0.1:9201]}
  - {name: postgres, endpoints: [127.0.0.1:5432]}
"""


WEB = "{name: web, endpoints: [127.0.0.1:9001, 127.0.0.1:9002]}"
POSTGRES = "{name: postgres, endpoints: [127.0.0.1:5432]}"
API_MATCH = "match: {prefix: /api}"
DURATION_HINT = "must be a duration string with a unit, e.g. '250ms' or '5s'"


def errors(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    found = {e.path: e.message for e in info.value.errors}
    assert len(found) == len(info.value.errors), "one error per path"
    return found


def edit(old: str, new: str) -> str:
    assert VALID.count(old) == 1, old
    return VALID.replace(old, new)


def assert_error(text: str, path: str, fragment: str) -> None:
    found = errors(text)
    assert path in found, found
    assert fragment in found[path]
    assert "pydantic" not in found[path] and "https://" not in found[path]


def test_valid_base_config_parses():
    parse_config(VALID)


# -- structure and types --------------------------------------------------------------------


def test_unknown_field_suggests_the_near_miss():
    found = errors(edit("    address: 127.0.0.1:8080", "    adress: 127.0.0.1:8080"))
    assert found["listeners[0].adress"] == "unknown field; did you mean 'address'?"
    assert found["listeners[0].address"] == "required field missing"


def test_unknown_field_without_a_near_miss():
    assert errors(edit("workers: 2", "workers: 2\nbanana: 1")) == {"banana": "unknown field"}


def test_unknown_field_deep_in_a_route():
    text = edit(API_MATCH, "match: {prefx: /api}")
    assert_error(text, "listeners[0].routes[0].match.prefx", "did you mean 'prefix'?")


def test_required_field_missing():
    assert_error(edit("    protocol: tcp\n", ""), "listeners[1].protocol", "required field missing")


@pytest.mark.parametrize(
    ("old", "new", "path", "message"),
    [
        ("workers: 2", "workers: two", "workers",
         "must be an integer from 1 to 256 or 'auto', got 'two'"),
        ("workers: 2", "workers: '2'", "workers",
         "must be an integer from 1 to 256 or 'auto', got '2'"),
        ("node: {id: web-1}", "node: web-1", "node", "must be a mapping, got 'web-1'"),
        ("node: {id: web-1}", "node: {id: 7}", "node.id", "must be a string, got 7"),
        (WEB, "{name: web, endpoints: 127.0.0.1:9001}", "clusters[0].endpoints",
         "must be a list, got '127.0.0.1:9001'"),
        (WEB, "{name: web, endpoints: [{address: 127.0.0.1:9101, weight: 1.5}]}",
         "clusters[0].endpoints[0].weight", "must be an integer, got 1.5"),
        (WEB, "{name: web, endpoints: [80]}", "clusters[0].endpoints[0]",
         "must be 'host:port' or a mapping with address and weight, got 80"),
        ("    cluster: postgres", "    cluster: postgres\n    splice: 'no'", "listeners[1].splice",
         "must be true or false, got 'no'"),
        ("    protocol: tcp", "    protocol: udp", "listeners[1].protocol",
         "must be 'http' or 'tcp', got 'udp'"),
        ("    cluster: postgres", "    cluster: postgres\n    max_connections: 0",
         "listeners[1].max_connections", "must be greater than 0, got 0"),
    ],
)
def test_type_errors_in_plain_words(old, new, path, message):
    assert_error(edit(old, new), path, message)


def test_workers_bounds():
    assert_error(edit("workers: 2", "workers: 0"), "workers", "from 1 to 256")
    assert_error(edit("workers: 2", "workers: 257"), "workers", "from 1 to 256")
    assert_error(edit("workers: 2", "workers: true"), "workers", "got true")


def test_at_least_one_listener():
    assert errors("listeners: []") == {"listeners": "must not be empty"}


@pytest.mark.parametrize("name", ["''", "'has space'", "'a/b'", "'ünï'"])
def test_names_are_restricted(name):
    text = edit("  - name: db", f"  - name: {name}")
    assert_error(text, "listeners[1].name", "must be a name of letters, digits")


# -- addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("xyz", "must be host:port, got 'xyz'"),
        ("127.0.0.1", "must be host:port, got '127.0.0.1'"),
        (":80", "must be host:port"),
        ("127.0.0.1:", "must be host:port"),
        ("::1:80", "IPv6 addresses must be in brackets, e.g. '[::1]:80'"),
        ("[1.2.3.4]:80", "in brackets must be an IPv6 address"),
        ("127.0.0.1:0", "port must be a number from 1 to 65535"),
        ("127.0.0.1:65536", "port must be a number from 1 to 65535"),
        ("127.0.0.1:http", "port must be a number from 1 to 65535"),
        ("256.0.0.1:80", "not a valid IP address or hostname"),
        ("bad_host:80", "not a valid IP address or hostname"),
        ("-lead.example:80", "not a valid IP address or hostname"),
        ("a..b:80", "not a valid IP address or hostname"),
    ],
)
def test_bad_endpoint_address(address, fragment):
    text = edit(POSTGRES, f"{{name: postgres, endpoints: ['{address}']}}")
    assert_error(text, "clusters[3].endpoints[0].address", fragment)


def test_listener_port_range_allows_zero_but_not_beyond_65535():
    assert_error(edit("127.0.0.1:15432", "127.0.0.1:70000"), "listeners[1].address", "from 0 to 65535")


def test_address_must_be_a_string():
    text = edit("127.0.0.1:15432", "15432")
    assert_error(text, "listeners[1].address", "must be a host:port string, got 15432")


def test_admin_must_be_loopback_without_token_file():
    text = edit("admin: {address: 127.0.0.1:15000}", "admin: {address: 0.0.0.0:15000}")
    assert_error(text, "admin.address", "must be a loopback address unless token_file is set")
    parse_config(edit("admin: {address: 127.0.0.1:15000}", "admin: {address: '[::1]:15000'}"))
    parse_config(edit("admin: {address: 127.0.0.1:15000}", "admin: {address: 'localhost:15000'}"))


# -- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("5", f"{DURATION_HINT}, got 5"),
        ("1.5", f"{DURATION_HINT}, got 1.5"),
        ("'5'", f"{DURATION_HINT}, got '5'"),
        ("5sec", f"{DURATION_HINT}, got '5sec'"),
        ("-1s", f"{DURATION_HINT}, got '-1s'"),
        ("true", f"{DURATION_HINT}, got true"),
        ("0s", "must be greater than 0, got '0s'"),
        ("0ms", "must be greater than 0, got '0ms'"),
    ],
)
def test_bad_durations(value, fragment):
    text = edit(API_MATCH, f"{API_MATCH}\n        timeout: {value}")
    assert_error(text, "listeners[0].routes[0].timeout", fragment)


# -- clusters -------------------------------------------------------------------------------


def test_empty_endpoint_list():
    text = edit("endpoints: [127.0.0.1:5432]", "endpoints: []")
    assert_error(text, "clusters[3].endpoints", "must not be empty")


def test_list_of_only_bad_endpoints_is_not_also_called_empty():
    found = errors(edit("endpoints: [127.0.0.1:5432]", "endpoints: [nope]"))
    assert "clusters[3].endpoints" not in found
    assert "clusters[3].endpoints[0].address" in found


@pytest.mark.parametrize("weight", [0, -3])
def test_non_positive_endpoint_weight(weight):
    endpoints = f"endpoints: [127.0.0.1:5431, {{address: 127.0.0.1:5432, weight: {weight}}}]"
    text = edit("endpoints: [127.0.0.1:5432]", endpoints)
    assert_error(text, "clusters[3].endpoints[1].weight", f"must be greater than 0, got {weight}")


def test_unknown_lb_policy():
    text = edit(POSTGRES, POSTGRES.replace("}", ", lb: fastest}"))
    assert_error(text, "clusters[3].lb", "must be 'round_robin', 'random', 'least_request', "
                 "'peak_ewma', 'ring_hash' or 'maglev', got 'fastest'")


@pytest.mark.parametrize("lb", ["ring_hash", "maglev"])
def test_hash_lb_needs_hash_on(lb):
    text = edit(POSTGRES, POSTGRES.replace("}", f", lb: {lb}}}"))
    assert errors(text) == {"clusters[3].hash_on": f"required for lb '{lb}'"}


@pytest.mark.parametrize("lb", ["round_robin", "random", "least_request", "peak_ewma"])
def test_hash_on_is_only_for_hash_lb(lb):
    text = edit(POSTGRES, POSTGRES.replace("}", f", lb: {lb}, hash_on: {{source_ip: true}}}}"))
    assert errors(text) == {
        "clusters[3].hash_on": f"only used by lb 'ring_hash' or 'maglev', not '{lb}'",
    }


@pytest.mark.parametrize(
    ("hash_on", "path", "message"),
    [
        ("{}", "", "set exactly one of header, cookie or source_ip: true (found none)"),
        ("{source_ip: false}", "", "set exactly one of header, cookie or source_ip: true (found none)"),
        ("{header: x-user, cookie: session}", "",
         "set exactly one of header, cookie or source_ip: true (found header and cookie)"),
        ("{header: 'x user'}", ".header", "must be a header name, got 'x user'"),
        ("{cookie: 'a;b'}", ".cookie", "must be a cookie name, got 'a;b'"),
        ("{source_ip: 'yes'}", ".source_ip", "must be true or false, got 'yes'"),
        ("{ip: true}", ".ip", "unknown field"),
        ("x-user", "", "must be a mapping, got 'x-user'"),
    ],
)
def test_bad_hash_on(hash_on, path, message):
    text = edit(POSTGRES, POSTGRES.replace("}", f", lb: maglev, hash_on: {hash_on}}}"))
    assert errors(text) == {f"clusters[3].hash_on{path}": message}


# -- routes ---------------------------------------------------------------------------------


def test_prefix_must_start_with_slash():
    assert errors(edit(API_MATCH, "match: {prefix: api}")) == {
        "listeners[0].routes[0].match.prefix": 'must start with "/"',
    }


def test_path_must_start_with_slash():
    text = edit(API_MATCH, "match: {path: healthz}")
    assert_error(text, "listeners[0].routes[0].match.path", 'must start with "/"')


@pytest.mark.parametrize("pattern", ["{prefix: '/api?v=1'}", "{path: '/a#b'}"])
def test_paths_cannot_hold_a_query(pattern):
    (message,) = errors(edit(API_MATCH, f"match: {pattern}")).values()
    assert message == "must be a path without '?' or '#' (query strings are not matched)"


HOST_HINT = "must be a host name such as 'api.example.com' or '*.example.com'"
NO_PORT = "must be a host name or IPv4 address without a port"


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("api.example.com:8080", f"{NO_PORT}, got 'api.example.com:8080'"),
        ("'[::1]'", f"{NO_PORT}, got '[::1]'"),
        ("'*.'", f"{HOST_HINT}, got '*.'"),
        ("'*'", f"{HOST_HINT}, got '*'"),
        ("'*.*.example.com'", f"{HOST_HINT}, got '*.*.example.com'"),
        ("'api.*.com'", f"{HOST_HINT}, got 'api.*.com'"),
        ("bad_host", f"{HOST_HINT}, got 'bad_host'"),
        ("80", "must be a string, got 80"),
    ],
)
def test_bad_host_match(host, message):
    text = edit(API_MATCH, f"match: {{prefix: /api, host: {host}}}")
    assert errors(text) == {"listeners[0].routes[0].match.host": message}


def test_prefix_and_path_are_exclusive():
    text = edit(API_MATCH, "match: {prefix: /api, path: /api/x}")
    assert_error(text, "listeners[0].routes[0].match.path", "set either prefix or path, not both")


def test_header_values_must_be_strings():
    text = edit(API_MATCH, "match: {prefix: /api, headers: {x-canary: 1, 'bad name': x}}")
    found = errors(text)
    assert found["listeners[0].routes[0].match.headers.x-canary"] == \
        "must be a string (quote numbers and booleans), got 1"
    assert "not a valid header name" in found["listeners[0].routes[0].match.headers.bad name"]


def test_header_names_ignore_case():
    text = edit(API_MATCH, "match: {prefix: /api, headers: {X-Canary: '1', x-canary: '2'}}")
    assert_error(text, "listeners[0].routes[0].match.headers.x-canary", "given twice")


def test_headers_must_be_a_mapping():
    text = edit(API_MATCH, "match: {prefix: /api, headers: [x-canary]}")
    assert_error(text, "listeners[0].routes[0].match.headers", "must be a mapping of header name")


def test_methods_must_be_tokens():
    text = edit(API_MATCH, "match: {prefix: /api, methods: [GET, 'NOT A METHOD']}")
    assert_error(text, "listeners[0].routes[0].match.methods[1]", "must be an HTTP method")


def test_route_needs_cluster_or_split():
    text = edit("        cluster: web\n", "")
    assert_error(text, "listeners[0].routes[1].cluster", "required field missing (or set split)")


def test_route_cannot_have_both_cluster_and_split():
    split = "        split: [{cluster: web, weight: 1}]\n"
    text = edit("        cluster: web\n", "        cluster: web\n" + split)
    assert_error(text, "listeners[0].routes[1].split", "set either cluster or split, not both")


def test_split_weight_must_be_positive():
    assert_error(edit("{cluster: api-v2, weight: 10}", "{cluster: api-v2, weight: 0}"),
                 "listeners[0].routes[0].split[1].weight", "must be greater than 0")


# -- listeners ------------------------------------------------------------------------------


def test_tcp_listener_needs_a_cluster_and_no_routes():
    text = edit("    cluster: postgres", "    routes: [{name: r, match: {prefix: /}, cluster: web}]")
    found = errors(text)
    assert found["listeners[1].cluster"] == "required for tcp listeners"
    assert "not allowed on tcp listeners" in found["listeners[1].routes"]


def test_http_listener_needs_routes_and_no_cluster():
    text = edit("    protocol: tcp", "    protocol: http")
    found = errors(text)
    assert "not allowed on http listeners" in found["listeners[1].cluster"]
    assert found["listeners[1].routes"] == "http listeners need at least one route"


# -- whole-config checks --------------------------------------------------------------------


def test_duplicate_listener_names():
    assert_error(edit("  - name: db", "  - name: http-in"), "listeners[1].name",
                 "duplicate listener name 'http-in' (also listeners[0])")


def test_duplicate_cluster_names():
    assert_error(edit("{name: api-v2, endpoints", "{name: api-v1, endpoints"), "clusters[2].name",
                 "duplicate cluster name 'api-v1' (also clusters[1])")


def test_duplicate_route_names_within_a_listener():
    assert_error(edit("      - name: default", "      - name: api"), "listeners[0].routes[1].name",
                 "duplicate route name 'api' (also listeners[0].routes[0])")


def test_same_route_name_in_different_listeners_is_fine():
    other = "  - name: http-2\n    address: 127.0.0.1:8081\n    protocol: http\n" \
            "    routes: [{name: api, match: {prefix: /}, cluster: web}]\n"
    parse_config(edit("clusters:\n", other + "clusters:\n"))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("127.0.0.1:8080", "0.0.0.0:8080"),
        ("'[::]:8080'", "10.1.2.3:8080"),
        ("'[::1]:8080'", "'[0:0::1]:8080'"),
    ],
)
def test_listen_address_clashes(first, second):
    text = edit("127.0.0.1:8080", first).replace("127.0.0.1:15432", second)
    found = errors(text)
    assert list(found) == ["listeners[1].address"]
    assert "clashes with listeners[0].address" in found["listeners[1].address"]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("0.0.0.0:0", "127.0.0.1:0"),
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("0.0.0.0:8080", "0.0.0.0:8081"),
    ],
)
def test_listen_addresses_that_do_not_clash(first, second):
    parse_config(edit("127.0.0.1:8080", first).replace("127.0.0.1:15432", second))


def test_unknown_cluster_references():
    text = (edit("{cluster: api-v2, weight: 10}", "{cluster: api-v3, weight: 10}")
            .replace("cluster: web\n", "cluster: webb\n")
            .replace("cluster: postgres", "cluster: mysql"))
    found = errors(text)
    assert found == {
        "listeners[0].routes[0].split[1].cluster": "unknown cluster 'api-v3'; did you mean 'api-v2'?",
        "listeners[0].routes[1].cluster": "unknown cluster 'webb'; did you mean 'web'?",
        "listeners[1].cluster": "unknown cluster 'mysql'",
    }


def test_a_cluster_with_errors_still_counts_as_defined():
    # Its own errors are reported; references to it are not called unknown.
    found = errors(edit(WEB, "{name: web, endpoints: []}"))
    assert found == {"clusters[0].endpoints": "must not be empty"}


# -- everything at once ---------------------------------------------------------------------

MANY_MISTAKES = """
workers: 0
admin: {address: 0.0.0.0:15000}
listeners:
  - name: http-in
    adress: 127.0.0.1:8080
    protocol: http
    routes:
      - name: api
        match: {prefix: api, headers: {x-canary: 1}}
        split: [{cluster: api-v3, weight: 0}]
        timeout: 5
      - name: api
        match: {prefix: /}
        cluster: web
  - name: http-in
    address: 0.0.0.0:8080
    protocol: tcp
    cluster: mysql
  - name: other
    address: 127.0.0.1:8080
    protocol: tcp
    cluster: web
clusters:
  - name: web
    endpoints: [xyz, {address: 127.0.0.1:9002, weight: -1}]
    lb: fastest
    connect_timeout: 0s
  - name: web
    endpoints: []
"""


def test_all_errors_are_reported_at_once():
    assert errors(MANY_MISTAKES) == {
        "workers": "must be an integer from 1 to 256 or 'auto', got 0",
        "admin.address": "must be a loopback address unless token_file is set, got 0.0.0.0:15000",
        "listeners[0].adress": "unknown field; did you mean 'address'?",
        "listeners[0].address": "required field missing",
        "listeners[0].routes[0].match.prefix": 'must start with "/"',
        "listeners[0].routes[0].match.headers.x-canary":
            "must be a string (quote numbers and booleans), got 1",
        "listeners[0].routes[0].split[0].weight": "must be greater than 0, got 0",
        "listeners[0].routes[0].timeout": f"{DURATION_HINT}, got 5",
        "listeners[0].routes[1].name": "duplicate route name 'api' (also listeners[0].routes[0])",
        "listeners[0].routes[0].split[0].cluster": "unknown cluster 'api-v3'",
        "listeners[1].name": "duplicate listener name 'http-in' (also listeners[0])",
        "listeners[1].cluster": "unknown cluster 'mysql'",
        "listeners[2].address": "127.0.0.1:8080 clashes with listeners[1].address 0.0.0.0:8080",
        "clusters[0].endpoints[0].address": "must be host:port, got 'xyz'",
        "clusters[0].endpoints[1].weight": "must be greater than 0, got -1",
        "clusters[0].lb": "must be 'round_robin', 'random', 'least_request', 'peak_ewma', "
                          "'ring_hash' or 'maglev', got 'fastest'",
        "clusters[0].connect_timeout": "must be greater than 0, got '0s'",
        "clusters[1].endpoints": "must not be empty",
        "clusters[1].name": "duplicate cluster name 'web' (also clusters[0])",
    }


def test_error_text_is_one_line_per_error():
    with pytest.raises(ConfigError) as info:
        parse_config(MANY_MISTAKES, "bad.yaml")
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.errors) == 19
    assert "workers: must be an integer from 1 to 256 or 'auto', got 0" in lines


# -- the file itself ------------------------------------------------------------------------


def test_yaml_syntax_error_gives_line_and_column():
    with pytest.raises(ConfigError) as info:
        parse_config("listeners:\n  - name: [a\n", "bad.yaml")
    (error,) = info.value.errors
    assert error.path == ""
    assert error.message.startswith("invalid YAML at line 3, column 1:")
    assert str(info.value).startswith("bad.yaml: invalid YAML at line 3")


def test_duplicate_yaml_key_is_an_error():
    with pytest.raises(ConfigError) as info:
        parse_config(VALID + "workers: 4\n")
    (error,) = info.value.errors
    assert "duplicate key 'workers'" in error.message and "line" in error.message


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "config is empty"), ("# nothing\n", "config is empty"), ("- a\n", "must be a mapping, got a list")],
)
def test_file_that_is_not_a_mapping(text, message):
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert info.value.errors == [FieldError("", message)]


def test_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (error,) = info.value.errors
    assert "cannot read config file: No such file or directory" in error.message
    assert info.value.source == str(path)
    assert str(info.value) == f"{path}: cannot read config file: No such file or directory"


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"node: {id: caf\xe9}\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(path)
