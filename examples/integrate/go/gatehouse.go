// net/http middleware that accepts gatehouse access tokens, verified with
// github.com/golang-jwt/jwt/v4 (the signature) and the standard library (the JWKS).
//
// Two ways to check a token, as two middlewares:
//
//   - RequireDevice: offline. The signature is checked against the server's JWKS
//     (fetched once, kept as long as the server's Cache-Control says, fetched again
//     when a token names a key the cached set lacks), then typ, iss, aud and the times.
//     No call to gatehouse per request, but a revocation is not seen before the token
//     expires.
//   - RequireLiveDevice: the same, then gatehouse's introspection endpoint (RFC 7662),
//     which also knows about revoked tokens, families, devices and keys.
//
// Both answer 401 with "WWW-Authenticate: Bearer ..." when the token is missing or not
// valid, and 503 when gatehouse cannot be asked (they fail closed). On success the
// handler finds the caller with DeviceFrom(r.Context()).
//
// Copy this file into your app. Configuration: ConfigFromEnv.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v4"
)

// gatehouse signs with Ed25519 (EdDSA) or P-256 (ES256). Nothing else is accepted:
// never "none", never HS256.
var allowedAlgorithms = []string{"EdDSA", "ES256"}

const (
	accessTokenTyp = "at+jwt"
	// gatehouse refuses longer tokens itself; so does this middleware, before parsing.
	maxTokenBytes = 8 * 1024
	// The least time between two JWKS fetches caused by unknown key ids.
	jwksCooldown = 10 * time.Second
	// How long a JWKS is kept when the server sends no max-age.
	jwksDefaultMaxAge = 5 * time.Minute
)

// Config says which gatehouse to trust and what its tokens must say.
type Config struct {
	// Issuer is the server's issuer, exactly as in its tokens' iss (tokens.issuer).
	// The JWKS and introspection URLs are derived from it.
	Issuer string
	// Audience is the aud this app expects (tokens.audience; gatehouse's default is
	// the issuer).
	Audience string
	// CAFile names a PEM file with the only certificate to trust for gatehouse (its
	// self-signed certificate). Empty: the system's CAs.
	CAFile string
	// ClientID and ClientSecret are the API client for introspection
	// (gatehouse clients create --name api). Needed by RequireLiveDevice only.
	ClientID, ClientSecret string
	// Leeway is the clock skew tolerated on exp, nbf and iat.
	Leeway time.Duration
}

// ConfigFromEnv reads AUTH_ISSUER, AUTH_AUDIENCE, AUTH_CA_FILE, AUTH_CLIENT_ID,
// AUTH_CLIENT_SECRET and AUTH_LEEWAY_SECONDS (default 30). Not GATEHOUSE_*: gatehouse
// itself refuses unknown variables with that prefix, and the two may share a shell.
func ConfigFromEnv() (Config, error) {
	cfg := Config{
		Issuer:       strings.TrimRight(os.Getenv("AUTH_ISSUER"), "/"),
		Audience:     os.Getenv("AUTH_AUDIENCE"),
		CAFile:       os.Getenv("AUTH_CA_FILE"),
		ClientID:     os.Getenv("AUTH_CLIENT_ID"),
		ClientSecret: os.Getenv("AUTH_CLIENT_SECRET"),
		Leeway:       30 * time.Second,
	}
	if cfg.Issuer == "" {
		return cfg, errors.New("AUTH_ISSUER is not set")
	}
	if cfg.Audience == "" {
		cfg.Audience = cfg.Issuer
	}
	if text := os.Getenv("AUTH_LEEWAY_SECONDS"); text != "" {
		seconds, err := strconv.Atoi(text)
		if err != nil || seconds < 0 {
			return cfg, fmt.Errorf("AUTH_LEEWAY_SECONDS: %q is not a number of seconds", text)
		}
		cfg.Leeway = time.Duration(seconds) * time.Second
	}
	return cfg, nil
}

// Device is the caller: a device that an operator paired.
type Device struct {
	ID        string // sub: the device id (dev_...)
	TokenID   string // jti
	Family    string // sid: the refresh-token family (one per pairing)
	ExpiresAt int64  // exp, Unix seconds
}

// invalidToken means 401; its reason goes to the log, never to the client.
type invalidToken struct{ reason string }

func (e *invalidToken) Error() string { return "invalid token: " + e.reason }

// unavailable means gatehouse could not be asked: 503.
type unavailable struct{ err error }

func (e *unavailable) Error() string { return "gatehouse unavailable: " + e.err.Error() }
func (e *unavailable) Unwrap() error { return e.err }

func refuse(reason string) error { return &invalidToken{reason} }

type publicKey struct {
	alg string
	key any // ed25519.PublicKey or *ecdsa.PublicKey
}

// Verifier checks tokens and holds the cached JWKS.
type Verifier struct {
	cfg    Config
	client *http.Client

	mu         sync.Mutex
	keys       map[string]publicKey
	fetchedAt  time.Time
	expiresAt  time.Time
	lastForced time.Time
}

// NewVerifier builds a Verifier. With cfg.CAFile it trusts exactly that certificate.
func NewVerifier(cfg Config) (*Verifier, error) {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s holds no PEM certificate", cfg.CAFile)
		}
		transport.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return &Verifier{
		cfg: cfg,
		client: &http.Client{
			Transport: transport,
			Timeout:   5 * time.Second,
			// gatehouse never redirects these endpoints; do not follow anyone who does.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}, nil
}

// accessClaims are the claims of a gatehouse access token. Valid does nothing: the
// checks run in Verify, after the signature, with the configured leeway.
type accessClaims struct {
	Iss string `json:"iss"`
	Aud string `json:"aud"` // a string: gatehouse never issues an array
	Sub string `json:"sub"`
	Exp *int64 `json:"exp"`
	Nbf *int64 `json:"nbf"`
	Iat *int64 `json:"iat"`
	Jti string `json:"jti"`
	Sid string `json:"sid"`
}

func (*accessClaims) Valid() error { return nil }

// Verify checks a token offline (RFC 8725): typ, kid, the key's own algorithm, the
// signature, iss, aud, exp, nbf and iat.
func (v *Verifier) Verify(token string) (Device, error) {
	// Bounded before parsing (golang-jwt v4 before 4.5.2 splits the token unbounded).
	if len(token) > maxTokenBytes || strings.Count(token, ".") != 2 {
		return Device{}, refuse("malformed")
	}
	claims := &accessClaims{}
	parser := jwt.NewParser(jwt.WithValidMethods(allowedAlgorithms))
	_, err := parser.ParseWithClaims(token, claims, func(t *jwt.Token) (any, error) {
		if typ, _ := t.Header["typ"].(string); typ != accessTokenTyp {
			return nil, refuse("wrong_typ")
		}
		kid, _ := t.Header["kid"].(string)
		if kid == "" {
			return nil, refuse("malformed")
		}
		key, err := v.key(kid)
		if err != nil {
			return nil, err
		}
		// The algorithm is the key's own, never the token's choice.
		if key.alg != t.Method.Alg() {
			return nil, refuse("algorithm")
		}
		return key.key, nil
	})
	if err != nil {
		var invalid *invalidToken
		var down *unavailable
		var validation *jwt.ValidationError
		switch {
		case errors.As(err, &invalid):
			return Device{}, invalid
		case errors.As(err, &down):
			return Device{}, down
		case errors.As(err, &validation) && validation.Errors&jwt.ValidationErrorSignatureInvalid != 0:
			if validation.Inner == nil {
				return Device{}, refuse("algorithm") // not in allowedAlgorithms
			}
			return Device{}, refuse("bad_signature")
		default:
			return Device{}, refuse("malformed")
		}
	}
	if claims.Iss != v.cfg.Issuer {
		return Device{}, refuse("wrong_issuer")
	}
	if claims.Aud != v.cfg.Audience {
		return Device{}, refuse("wrong_audience")
	}
	if claims.Sub == "" || claims.Jti == "" || claims.Sid == "" ||
		claims.Exp == nil || claims.Nbf == nil || claims.Iat == nil {
		return Device{}, refuse("malformed")
	}
	now := time.Now()
	leeway := v.cfg.Leeway
	if !now.Before(time.Unix(*claims.Exp, 0).Add(leeway)) {
		return Device{}, refuse("expired")
	}
	if time.Unix(*claims.Nbf, 0).After(now.Add(leeway)) || time.Unix(*claims.Iat, 0).After(now.Add(leeway)) {
		return Device{}, refuse("not_yet_valid")
	}
	return Device{ID: claims.Sub, TokenID: claims.Jti, Family: claims.Sid, ExpiresAt: *claims.Exp}, nil
}

// key finds a signing key by kid: from the cached JWKS while it is fresh, fetched
// again when it is stale or (at most once per jwksCooldown) when kid is unknown.
func (v *Verifier) key(kid string) (publicKey, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	now := time.Now()
	if v.keys == nil || !now.Before(v.expiresAt) {
		if err := v.fetchLocked(now); err != nil {
			if v.keys == nil {
				return publicKey{}, &unavailable{err}
			}
			// Keep the stale set for a while rather than refusing every token.
			log.Printf("gatehouse: JWKS refresh failed, keeping the cached keys: %v", err)
			v.expiresAt = now.Add(jwksCooldown)
		}
	}
	if key, ok := v.keys[kid]; ok {
		return key, nil
	}
	if now.Sub(v.lastForced) >= jwksCooldown && now.Sub(v.fetchedAt) > 0 {
		v.lastForced = now
		if err := v.fetchLocked(now); err != nil {
			return publicKey{}, &unavailable{err}
		}
		if key, ok := v.keys[kid]; ok {
			return key, nil
		}
	}
	return publicKey{}, refuse("unknown_key")
}

var maxAgePattern = regexp.MustCompile(`(?:^|[,\s])max-age=(\d+)`)

func (v *Verifier) fetchLocked(now time.Time) error {
	req, err := http.NewRequest(http.MethodGet, v.cfg.Issuer+"/.well-known/jwks.json", nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/jwk-set+json, application/json")
	resp, err := v.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("JWKS answered %d", resp.StatusCode)
	}
	var set struct {
		Keys []struct {
			Kty string `json:"kty"`
			Crv string `json:"crv"`
			Alg string `json:"alg"`
			Use string `json:"use"`
			Kid string `json:"kid"`
			X   string `json:"x"`
			Y   string `json:"y"`
		} `json:"keys"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&set); err != nil {
		return fmt.Errorf("JWKS: %w", err)
	}
	keys := map[string]publicKey{}
	for _, k := range set.Keys {
		if k.Kid == "" || (k.Use != "" && k.Use != "sig") {
			continue
		}
		x, errX := base64.RawURLEncoding.DecodeString(k.X)
		switch {
		case k.Kty == "OKP" && k.Crv == "Ed25519" && (k.Alg == "" || k.Alg == "EdDSA"):
			if errX == nil && len(x) == ed25519.PublicKeySize {
				keys[k.Kid] = publicKey{"EdDSA", ed25519.PublicKey(x)}
			}
		case k.Kty == "EC" && k.Crv == "P-256" && (k.Alg == "" || k.Alg == "ES256"):
			y, errY := base64.RawURLEncoding.DecodeString(k.Y)
			if errX != nil || errY != nil || len(x) != 32 || len(y) != 32 {
				continue
			}
			pub := &ecdsa.PublicKey{Curve: elliptic.P256(), X: new(big.Int).SetBytes(x), Y: new(big.Int).SetBytes(y)}
			if pub.Curve.IsOnCurve(pub.X, pub.Y) {
				keys[k.Kid] = publicKey{"ES256", pub}
			}
		}
	}
	maxAge := jwksDefaultMaxAge
	if m := maxAgePattern.FindStringSubmatch(resp.Header.Get("Cache-Control")); m != nil {
		if seconds, err := strconv.Atoi(m[1]); err == nil {
			maxAge = time.Duration(seconds) * time.Second
		}
	}
	if maxAge < time.Second {
		maxAge = time.Second
	} else if maxAge > 24*time.Hour {
		maxAge = 24 * time.Hour
	}
	v.keys, v.fetchedAt, v.expiresAt = keys, now, now.Add(maxAge)
	return nil
}

// Introspect asks gatehouse (POST /v1/introspect, HTTP Basic) whether token is active
// now, revocations included, and returns the device it names.
func (v *Verifier) Introspect(token string) (active bool, sub string, err error) {
	if v.cfg.ClientID == "" || v.cfg.ClientSecret == "" {
		return false, "", &unavailable{errors.New("AUTH_CLIENT_ID and AUTH_CLIENT_SECRET are not set")}
	}
	form := url.Values{"token": {token}}.Encode()
	req, err := http.NewRequest(http.MethodPost, v.cfg.Issuer+"/v1/introspect", strings.NewReader(form))
	if err != nil {
		return false, "", &unavailable{err}
	}
	req.SetBasicAuth(v.cfg.ClientID, v.cfg.ClientSecret)
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	resp, err := v.client.Do(req)
	if err != nil {
		return false, "", &unavailable{err}
	}
	defer resp.Body.Close()
	// 401: this app's client credentials are wrong or revoked; 429: its budget is
	// spent. Neither says anything about the token.
	if resp.StatusCode != http.StatusOK {
		return false, "", &unavailable{fmt.Errorf("introspection answered %d", resp.StatusCode)}
	}
	var answer struct {
		Active bool   `json:"active"`
		Sub    string `json:"sub"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&answer); err != nil {
		return false, "", &unavailable{err}
	}
	return answer.Active, answer.Sub, nil
}

type deviceKey struct{}

// DeviceFrom returns the device that RequireDevice or RequireLiveDevice let through.
func DeviceFrom(ctx context.Context) (Device, bool) {
	device, ok := ctx.Value(deviceKey{}).(Device)
	return device, ok
}

// RequireDevice lets a request through only with a valid access token (offline check).
func (v *Verifier) RequireDevice(next http.Handler) http.Handler { return v.require(next, false) }

// RequireLiveDevice also asks gatehouse, so a revoked token is refused at once.
func (v *Verifier) RequireLiveDevice(next http.Handler) http.Handler { return v.require(next, true) }

func (v *Verifier) require(next http.Handler, live bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
		if !strings.EqualFold(scheme, "bearer") || token == "" {
			// No token at all (RFC 6750 section 3.1: no error code).
			w.Header().Set("WWW-Authenticate", `Bearer realm="api"`)
			writeJSON(w, http.StatusUnauthorized, "an access token is required")
			return
		}
		device, err := v.Verify(token)
		if err == nil && live {
			var active bool
			var sub string
			active, sub, err = v.Introspect(token)
			if err == nil && (!active || sub != device.ID) {
				err = refuse("inactive")
			}
		}
		var invalid *invalidToken
		switch {
		case err == nil:
			next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), deviceKey{}, device)))
		case errors.As(err, &invalid):
			log.Printf("gatehouse token refused: reason=%s", invalid.reason)
			w.Header().Set("WWW-Authenticate", `Bearer realm="api", error="invalid_token"`)
			writeJSON(w, http.StatusUnauthorized, "the access token is invalid, expired or revoked")
		default:
			log.Printf("%v", err)
			w.Header().Set("Retry-After", "5")
			writeJSON(w, http.StatusServiceUnavailable, "the token cannot be checked now")
		}
	})
}

func writeJSON(w http.ResponseWriter, status int, message string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": message})
}
