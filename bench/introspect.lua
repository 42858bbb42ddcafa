-- wrk script for gatehouse's /v1/introspect (RFC 7662): every request is a POST of one
-- access token, authenticated with HTTP Basic client credentials (client_secret_basic).
-- AUTH holds the whole Authorization value, TOKEN the access token; introspect.sh sets both.
local auth = os.getenv("AUTH")
local token = os.getenv("TOKEN")
if not auth or not token then
  error("set AUTH (\"Basic <base64 id:secret>\") and TOKEN (an access token)")
end
wrk.method = "POST"
wrk.headers["Authorization"] = auth
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.body = "token=" .. token
