-- wrk script for the front-door benchmark (bench/front.sh): every request is a GET of /
-- with a device access token as `Authorization: Bearer`. TOKEN holds the token; front.sh
-- sets it. The same request goes to every case, the ones that do not check it included.
local token = os.getenv("TOKEN")
if not token then
  error("set TOKEN (a device access token)")
end
wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer " .. token
