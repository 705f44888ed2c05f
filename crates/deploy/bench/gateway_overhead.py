import http.client, json, time, statistics, sys
def run(port, n=300, stream=False):
    c = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1, "temperature": 0, "stream": stream})
    lat = []
    for i in range(n + 20):
        t = time.perf_counter()
        c.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        r = c.getresponse(); r.read()
        assert r.status == 200, r.status
        if i >= 20: lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    return statistics.median(lat), lat[int(len(lat) * 0.99)]
for name, port in [("direct", 18101), ("gateway", 18080)]:
    m, p99 = run(port)
    print(f"{name:8} max_tokens=1  p50 {m:.2f} ms  p99 {p99:.2f} ms")
