"""Bounce classification: one SMTP failure -> a sisimai reason, hard or soft, and the rule that said so.

``classify`` is a pure function over one ordered rules table (``RULES``). The facts in it (reason
names, phrases, status codes, the order) come from sisimai, the reference bounce classifier; the
code is Relay's own. The walk:

1. ``RULES`` in order: Relay's own replies, provider and MTA specific texts (sisimai's rhost and
   lhost facts: Google, Microsoft, Yahoo, qmail...), then sisimai's reasons in sisimai's order.
   A rule matches on its phrases (or ordered pieces) in the reply text, or on its enhanced
   status codes / reply codes. The text outranks the code: mailboxfull comes first, a status
   match is vetoed when the text says what another reason owns (a 5.1.1 that says "relay access
   denied" is ``norelaying``), and every text-only rule comes before the status table.
2. The status table (``STATUS``): an exact enhanced code -> reason; x.0.0 says nothing.
3. Fallbacks: x.6.x contenterror, x.7.x securityerror, a refusal at EHLO/HELO blocked,
   401-407/501-507 syntaxerror, 521/556 notaccept, any text onhold, nothing at all undefined.

sisimai's later names are used: mesgtoobig and exceedlimit are ``emailtoolarge``, speeding and
toomanyconn are ``ratelimited``.

It runs on the event loop once per failed recipient, so everything is precompiled, the text is
capped, and matching is plain substring search (no backtracking). It never raises.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Final

__all__ = ["REASONS", "RULES", "STATUS", "Classification", "Rule", "classify", "expired"]

log = logging.getLogger(__name__)

REASONS: Final[tuple[str, ...]] = (
    "userunknown",
    "hostunknown",
    "hasmoved",
    "mailboxfull",
    "notaccept",
    "blocked",
    "spamdetected",
    "policyviolation",
    "ratelimited",
    "emailtoolarge",
    "contenterror",
    "securityerror",
    "authfailure",
    "badreputation",
    "requireptr",
    "norelaying",
    "rejected",
    "filtered",
    "suspend",
    "systemerror",
    "systemfull",
    "networkerror",
    "failedstarttls",
    "notcompliantrfc",
    "mailererror",
    "syntaxerror",
    "virusdetected",
    "expired",
    "onhold",
    "feedback",
    "vacation",
    "suppressed",
    "undefined",
)

# Reasons that mean the address will never work (sisimai's hard bounces); notaccept only with 5xx.
_HARD: Final = frozenset({"userunknown", "hostunknown", "hasmoved"})

# Beyond this the reply text says nothing new; capping keeps a hostile 2 MB reply cheap.
_MAX_TEXT: Final = 4096


@dataclass(frozen=True, slots=True)
class Classification:
    """A failure's reason (one of REASONS), whether it is hard, and the rule that decided it."""

    reason: str
    hard: bool
    rule: str

    def details(self) -> dict[str, object]:
        return {"reason": self.reason, "hard": self.hard, "rule": self.rule}


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the table: a reason and when it applies.

    ``phrases`` are substrings of the lower-cased, whitespace-collapsed text; ``pieces`` are
    substrings that must appear in that order. ``statuses`` (exact enhanced codes) and ``codes``
    (reply codes) match without any text, unless the text says one of the ``unless`` reasons.
    Conditions on the text match: ``not_commands``, not after these SMTP commands;
    ``only_commands``, only after these (an unknown command is neither); ``only_statuses``, only
    with one of these enhanced codes (or prefixes ending in "."); ``status_silent``, only where
    the status names no reason (x.0.x and x.x.0 name none here); ``sender_side``, only after MAIL,
    after DATA unless the status says userunknown, or where the status names no reason or a weak
    one (sisimai's rule for sender rejections, whose words also occur in recipient rejections).
    """

    reason: str
    phrases: tuple[str, ...] = ()
    pieces: tuple[tuple[str, ...], ...] = ()
    statuses: tuple[str, ...] = ()
    codes: frozenset[int] = frozenset()
    unless: tuple[str, ...] = ()
    not_commands: frozenset[str] = frozenset()
    only_commands: frozenset[str] = frozenset()
    only_statuses: tuple[str, ...] = ()
    status_silent: bool = False
    sender_side: bool = False
    group: str = ""  # where the facts come from, for readers: "relay", "google", "microsoft", ...


def _status_in(enhanced: str | None, statuses: tuple[str, ...]) -> str | None:
    if enhanced is None:
        return None
    for status in statuses:
        if enhanced == status or (status.endswith(".") and enhanced.startswith(status)):
            return status
    return None


_EARLY_COMMANDS: Final = frozenset({"CONN", "EHLO", "HELO", "MAIL", "RCPT"})

# -- phrase lists (sisimai's, per reason) ---------------------------------------------------------

_MAILBOXFULL = (
    "452 insufficient disk space",
    "account disabled temporarly for exceeding receiving limits",
    "account is exceeding their quota",
    "account is over quota",
    "account is temporarily over quota",
    "boite du destinataire pleine",
    "delivery failed: over quota",
    "disc quota exceeded",
    "diskspace quota",
    "does not have enough space",
    "exceeded storage allocation",
    "exceeding its mailbox quota",
    "full mailbox",
    "is over disk quota",
    "is over quota temporarily",
    "mail file size exceeds the maximum size allowed for mail delivery",
    "mail quota exceeded",
    "mailbox exceeded the local limit",
    "mailbox full",
    "mailbox has exceeded its disk space limit",
    "mailbox is full",
    "mailbox over quota",
    "mailbox quota usage exceeded",
    "mailbox size limit exceeded",
    "maildir over quota",
    "maildir delivery failed: userdisk quota ",
    "maildir delivery failed: domaindisk quota ",
    "mailfolder is full",
    "no space left on device",
    "not enough disk space",
    "not enough storage space in",
    "not sufficient disk space",
    "over the allowed quota",
    "quota exceeded",
    "quota violation for",
    "recipient reached disk quota",
    "recipient rejected: mailbox would exceed maximum allowed storage",
    "the recipient mailbox has exceeded its disk space limit",
    "the user's space has been used up",
    "the user you are trying to reach is over quota",
    "too much mail data",
    "user has exceeded quota, bouncing mail",
    "user has too many messages on the server",
    "user is over quota",
    "user is over the quota",
    "user over quota",
    "was automatically rejected: quota exceeded",
    "would be over the allowed quota",
    "inbox is out of storage space",  # Google
    "storage quota exceeded",  # Gmail
)

_EMAILTOOLARGE = (
    "exceeded maximum inbound message size",
    "exceeded the maximum incoming message size",
    "line limit exceeded",
    "max message size exceeded",
    "message file too big",
    "message header size exceeds limit",
    "message length exceeds administrative limit",
    "message size exceeds fixed limit",
    "message size exceeds fixed maximum message size",
    "message size exceeds maximum value",
    "message too big",
    "message too large",
    "size limit",
    "taille limite du message atteinte",
    "exceeded google's message size limits",
    "exceeds google's message size limit of",
    "exceeds google's message header size limit",
)

_SUSPEND = (
    " is currently suspended",
    " temporary locked",
    "archived recipient",
    "boite du destinataire archivee",
    "email account that you tried to reach is disabled",
    "account that you tried to reach is inactive",  # Google
    "has been suspended",
    "inactive account",
    "invalid/inactive user",
    "is a deactivated mailbox",
    "is unavailable: user is terminated",
    "mailbox currently suspended",
    "mailbox disabled",
    "mailbox is frozen",
    "mailbox unavailable or access denied",
    "recipient rejected: temporarily inactive",
    "recipient suspend the service",
    "this account has been disabled or discontinued",
    "this account has been temporarily suspended",
    "this address no longer accepts mail",
    "this mailbox is disabled",
    "user or domain is disabled",
    "user suspended",
    "vdelivermail: account is locked email bounced",
    "access denied, banned recipient",  # Microsoft 5.7.505
    "mailbox cannot be accessed",  # Microsoft 5.2.1
)

_HASMOVED = (" has been replaced by ",)

_NORELAYING = (
    "as a relay",
    "email address is not verified.",
    "insecure mail relay",
    "is not permitted to relay through this server without authentication",
    "mail server requires authentication when attempting to send to a non-local e-mail address",
    "no relaying",
    "not a gateway",
    "not allowed to relay through this machine",
    "not an open relay, so get lost",
    "not local host",
    "relay access denied",
    "relay denied",
    "relaying mail to ",
    "relay not permitted",
    "relaying denied",
    "specified domain is not allowed",
    "that domain isn't in my list of allowed rcpthost",
    "this system is not configured to relay mail",
    "unable to relay",
    "we don't handle mail for",
    "mail relay denied",  # Google
)

_AUTHFAILURE = (
    "//spf.pobox.com",
    "bad spf records for",
    "dmarc policy",
    "please inspect your spf settings",
    "sender policy framework (spf) fail",
    "sender policy framework violation",
    "spf (sender policy framework) domain authentication fail",
    "spf check: fail",
    "does not pass dmarc verification",  # Microsoft 5.7.509
    "senders to authenticate with either spf or dkim",  # Google, Yahoo
    "has an spf record with a hard fail policy",  # Google
    "fails to pass spf checks",  # Google
    "fails to pass authentication checks",  # Google
    "the spf record of the sending domain",  # Google
    "must pass either spf or dkim validation",  # Microsoft
    "gmail requires all senders to authenticate",  # Google
)
_AUTHFAILURE_PIECES = (
    (" is not allowed to send mail.", "_401"),
    ("is not allowed to send from <", " per it's spf record"),
)

_USERUNKNOWN = (
    "#5.1.1 bad address",
    "550 address invalid",
    "5.1.0 address rejected.",
    "address does not exist",
    "address not present in directory",
    "address unknown",
    "can't accept user",
    "does not exist.",
    "destination addresses were unknown",
    "destination server rejected recipients",
    "email address does not exist",
    "email address could not be found",
    "invalid address",
    "invalid mailbox",
    "invalid recipient",
    "is not a known user",
    "is not a valid mailbox",
    "is not an active address at this host",
    "mailbox does not exist",
    "mailbox invalid",
    "mailbox is inactive",
    "mailbox is unavailable",
    "mailbox not present",
    "mailbox not found",
    "mailbox unavaiable",
    "nessun utente simile in questo indirizzo",
    "no account by that name here",
    "no existe dicha persona",
    "no existe ese usuario ",
    "no mail box available for this user",
    "no mailbox by that name is currently available",
    "no mailbox found",
    "no such address here",
    "no such mailbox",
    "no such person at this address",
    "no such recipient",
    "no such user",
    "no thank you rejected: account unavailable",
    "no valid recipients, bye",
    "not a valid recipient",
    "not a valid user here",
    "not a local address",
    "not email addresses",
    "recipient address rejected. (in reply to rcpt to command)",
    "recipient address rejected: access denied",
    "recipient address rejected: invalid user",
    "recipient address rejected: invalid-recipient",
    "recipient address rejected: unknown user",
    "recipient address rejected: userunknown",
    "recipient does not exist",
    "recipient is not accepted",
    "recipient is not local",
    "recipient not exist",
    "recipient not found",
    "recipient not ok",
    "recipient refuses to accept your mail",
    "recipient unknown",
    "requested action not taken: mailbox unavailable",
    "resolver.adr.recipient notfound",
    "resolver.adr.recipientnotfound",  # Microsoft
    "resolver.adr.exrecipnotfound",  # Microsoft
    "sorry, user unknown",
    "sorry, badrcptto",
    "sorry, no mailbox here by that name",
    "sorry, your envelope recipient has been denied",
    "that domain or user isn't in my list of allowed rcpthosts",
    "the email account that you tried to reach does not exist",
    "the following recipients was undeliverable",
    "the user's email name is not found",
    "there is no one at this address",
    "this email address is wrong or no longer valid",
    "this recipient is in my badrecipientto list",
    "this recipient is not in my validrcptto list",
    "this spectator does not exist",
    "unknown mailbox",
    "unknown recipient",
    "unknown user",
    "user does not exist",
    "user missing home directory",
    "user not active",
    "user not exist",
    "user not found",
    "user not known",
    "user unknown",
    "utilisateur inconnu !",
    "vdeliver: invalid or unknown virtual user",
    "your envelope recipient is in my badrcptto list",
    "dd this user doesn't have a ",  # Yahoo
    "remote server returned unknown recipient or mailbox unavailable",  # Microsoft
)
_USERUNKNOWN_PIECES = (
    ("<", "> not found"),
    ("<", ">... blocked by "),
    ("account ", " does not exist at the organization"),
    ("bad", "recipient"),
    ("mailbox ", "does not exist"),
    ("mailbox ", "unavailable or access denied"),
    ("no ", " in name directory"),
    ("non", "existent user"),
    ("rcpt <", " does not exist"),
    ("rcpt (", "t exist "),
    ("recipient ", " was not found in"),
    ("recipient address rejected: user ", " does not exist"),
    ("recipient address rejected: user unknown in ", " table"),
    ("this user doesn't have a ", " account"),
    ("unknown e", "mail address"),
    ("unknown local", "part"),
    ("user ", " was not found"),
    ("user ", " does not exist"),
    ("user (", ") unknown"),
)

_FILTERED = (
    "because the recipient is only accepting mail from specific email addresses",
    "bounced address",
    "due to extended inactivity new mail is not currently being accepted for this mailbox",
    "has restricted sms e-mail",
    "is not accepting any mail",
    "message filtered",
    "message rejected due to user rules",
    "not found recipient account",
    "refused due to recipient preferences",
    "resolver.rst.notauthorized",
    "this account is protected by",
    "user not found",
    "user refuses to receive this mail",
    "user reject",
    "we failed to deliver mail because the following address recipient id refuse to receive mail",
    "you have been blocked by the recipient",
)

_REQUIREPTR = (
    "access denied. ip name lookup failed",
    "all mail servers must have a ptr record with a valid reverse dns entry",
    "bad dns ptr resource record",
    "cannot find your hostname",
    "cannot resolve your address.",
    "fix reverse dns for ",
    "ips with missing ptr records",
    "no ptr record found.",
    "please get a custom reverse dns name from your isp for your host",
    "ptr record setup",
    "reverse dns failed",
    "reverse dns required",
    "sender ip reverse lookup rejected",
    "the corresponding forward dns entry does not point to the sending ip",
    "this system will not accept messages from servers/devices with no reverse dns",
    "unresolvable relay host name",
    "we do not accept mail from hosts with dynamic ip or generic dns ptr-records",
    "does not have a ptr record",  # Google
    "must have a reverse dns record",  # Microsoft
)
_REQUIREPTR_PIECES = (
    ("domain ", " mismatches client ip"),
    ("dns lookup failure: ", " try again later"),
    ("reverse dns lookup for host ", " failed permanently"),
    ("server access ", " forbidden by invalid rdns record of your mail server"),
    ("service permits ", " unverifyable sending ips"),
)

_NOTCOMPLIANTRFC = (
    "duplicate header",
    "this message is not rfc 5322 compliant",
    "https://support.google.com/mail/?p=rfcmessagenoncompliant",
    "headers are not rfc compliant",  # Yahoo
    "missing a valid message-id: header",  # Google
    "multiple addresses in from: header are not accepted",  # Google
)
_NOTCOMPLIANTRFC_PIECES = ((" multiple ", " header"),)

_BADREPUTATION = (
    "a poor email reputation score",
    "has been temporarily rate limited due to ip reputation",
    "ip/domain reputation problems",
    "likely suspicious due to the very low reputation",
    "none/bad reputation",
    "the sending mta's poor reputation",
    "very low reputation of the sending",  # Google
)

_CONTENTERROR = (
    "header size exceeds maximum permitted",
    "improper use of 8-bit data in message header",
    "message header size, or recipient list, exceeds policy limit",
    "message mime complexity exceeds the policy maximum",
    "routing loop detected -- too many received: headers",
    "this message contain invalid mime headers",
    "this message contain improperly-formatted binary content",
    "this message contain text that uses unnecessary base64 encoding",
)

_REJECTED = (
    "access denied (in reply to mail from command)",
    "access denied (sender blacklisted)",
    "address rejected",
    "administrative prohibition",
    "batv failed to verify",
    "batv validation failure",
    "backscatter protection detected an invalid or expired email address",
    "because the sender isn't on the recipient's list of senders to accept mail from",
    "bogus mail from",
    "can't determine purported responsible address",
    "connections not accepted from servers without a valid sender domain",
    "denied [bouncedeny]",
    "denied by secumail valid-address-filter",
    "delivery not authorized, message refused",
    "does not exist e2110",
    "domain of sender address ",
    "email address is on senderfilterconfig list",
    "emetteur invalide",
    "empty envelope senders not allowed",
    "envelope blocked - ",
    "error: no third-party dsns",
    "from: domain is invalid. please provide a valid from:",
    "fully qualified email address required",
    "invalid domain, see <url:",
    "invalid sender",
    "is not a registered gateway user",
    "mail from not owned by user",
    "message rejected: email address is not verified",
    "mx records for ",
    "null sender is not allowed",
    "recipient addresses rejected : access denied",
    "recipient not accepted. (batv: no tag",
    "returned mail not accepted here",
    "rfc 1035 violation: recursive cname records for",
    "rule imposed mailbox access for",
    "sending this from a different address or alias using the ",
    "sender address has been blacklisted",
    "sender email address rejected",
    "sender is in my black list",
    "sender is spammer",
    "sender not pre-approved",
    "sender rejected",
    "sender domain is empty",
    "sender verify failed",
    "sender was rejected",
    "spam reporting address",
    "syntax error: empty email address",
    "the message has been rejected by batv defense",
    "this server does not accept mail from",
    "transaction failed unsigned dsn for",
    "unroutable sender address",
    "you are not allowed to post to this mailing list",
    "you are sending to/from an address that has been blacklisted",
    "your access to submit messages to this e-mail system has been rejected",
    "your email address has been blacklisted",
)
# Texts that look like "address rejected" but are about the recipient or the client's IP.
_REJECTED_NOT = ("5.1.0 address rejected", "recipient address rejected", "sender ip address rejected")

_HOSTUNKNOWN = (
    "domain does not exist",
    "domain is not reachable",
    "domain must exist",
    "host or domain name not found",
    "host unknown",
    "host unreachable",
    "mail domain mentioned in email address is unknown",
    "name or service not known",
    "no such domain",
    "recipient address rejected: unknown domain name",
    "recipient domain must exist",
    "the account or domain may not exist",
    "unknown host",
    "unroutable address",
    "unrouteable address",
    "we weren't able to find the recipient domain",  # Google
)
_HOSTUNKNOWN_PIECES = (("553 ", " does not exist"),)

_SPAMDETECTED = (
    " - spam",
    "//www.spamhaus.org/help/help_spam_16.htm",
    "//dsbl.org/help/help_spam_16.htm",
    "//mail.163.com/help/help_spam_16.htm",
    "554 5.7.0 reject, id=",
    "appears to be unsolicited",
    "blacklisted url in message",
    "block for spam",
    "blocked by policy: no spam please",
    "blocked by spamassassin",
    "blocked for abuse. see http://att.net/blocks",
    "cannot be forwarded because it was detected as spam",
    "considered unsolicited bulk e-mail (spam) by our mail filters",
    "content filter rejection",
    "cyberoam anti spam engine has identified this email as a bulk email",
    "denied due to spam list",
    "high probability of spam",
    "is classified as spam and is rejected",
    "listed in work.drbl.imedia.ru",
    "the mail server detected your message as spam and has prevented delivery.",
    "mail appears to be unsolicited",
    "mail content denied",
    "may consider spam",
    "message considered as spam or virus",
    "message contains spam or virus",
    "message content rejected",
    "message detected as spam",
    "message filtered",
    "message looks like spam",
    "message is being rejected as it seems to be a spam",
    "message refused by mailmarshal spamprofiler",
    "message refused by trustwave seg spamprofiler",
    "message rejected as spam",
    "message rejected because of unacceptable content",
    "message rejected due to suspected spam content",
    "message rejected for policy reasons",
    "message was rejected for possible spam/virus content",
    "our email server thinks this email is spam",
    "our system has detected that this message is ",
    "probable spam",
    "reject bulk.advertising",
    "rejected: spamassassin score ",
    "rejected - bulk email",
    "rejecting banned content",
    "rejecting mail content",
    "related to content with spam-like characteristics",
    "sender domain listed at ",
    "sending address not accepted due to spam filter",
    "spam blocked",
    "spam check",
    "spam content matched",
    "spam detected",
    "spam email",
    "spam message rejected.",
    "spam not accepted",
    "spam refused",
    "spam rejection",
    "spam score ",
    "spambouncer identified spam",
    "spamming not allowed",
    "too many spam complaints",
    "too much spam.",
    "the email message was detected as spam",
    "the message has been rejected by spam filtering engine",
    "the message was rejected due to classification as bulk mail",
    "the content of this message looked like spam",
    "this message appears to be spam",
    "this message has been identified as spam",
    "this message has been scored as spam with a probability",
    "this message was classified as spam",
    "this message was rejected by recurrent pattern detection system",
    "transaction failed spam message not queued",
    "we dont accept spam",
    "your email appears similar to spam we have received before",
    "your email breaches local uribl policy",
    "your email had spam-like ",
    "your email is considered spam",
    "your email is probably spam",
    "your email was detected as spam",
    "your message as spam and has prevented delivery",
    "your message has been temporarily blocked by our filter",
    "your message has been rejected because it appears to be spam",
    "your message has triggered a spam block",
    "your message may contain the spam contents",
    "your message failed several antispam checks",
    "likely unsolicited mail",  # Google
    "content filter agent quarantined this message",  # Microsoft
)
_SPAMDETECTED_PIECES = (
    ("greylisted", " please try again in"),
    ("mail score (", " over "),
    ("mail rejete. mail rejected. ", "506"),
    ("our filters rate at and above ", " percent probability of being spam"),
    ("rejected by ", " (spam)"),
    ("rejected due to spam ", "classification"),
    ("rejected due to spam ", "content"),
    ("rule imposed as ", " is blacklisted on"),
    ("spam ", " exceeded"),
    ("this message scored ", " spam points"),
)

_RATELIMITED = (
    # sisimai's speeding
    "mail sent from your ip address has been temporarily rate limited",
    "please try again slower",
    "receiving mail at a rate that prevents additional messages from being delivered",
    "is receiving mail too quickly",
    "this mail has been rate limited",
    "daily sending quota exceeded",
    "daily user sending limit exceeded",
    "submission quota exceeded",
    "message receive limit",
    "has exceeded permitted limits within",
    "access denied, tenant has exceeded threshold",
    # sisimai's toomanyconn
    "all available ips are at maximum connection limit",
    "connection rate limit exceeded",
    "exceeds per-domain connection limit for",
    "has exceeded the max emails per hour ",
    "throttling failure: daily message quota exceeded",
    "throttling failure: maximum sending rate exceeded",
    "too many connections",
    "too many concurrent smtp connections",
    "too many errors from your ip",
    "too many recipients",
    "too many smtp sessions for this host",
    "trop de connexions, ",
    "we have already made numerous attempts to deliver this message",
    "has exceeded the maximum number of connections",
    "max message per connection reached",
)

_BLOCKED = (
    " said: 550 blocked",
    "//www.spamcop.net/bl.",
    "bad sender ip address",
    "banned sending ip",
    "blacklisted by",
    "blocked using ",
    "blocked - see http",
    "dnsbl:attrbl",
    "client host rejected: abus detecte gu_eib_02",
    "client host rejected: abus detecte gu_eib_04",
    "client host rejected: may not be mail exchanger",
    "client host rejected: was not authenticated",
    "confirm this mail server",
    "connection dropped",
    "connection refused by",
    "connection reset by peer",
    "connection was dropped by remote host",
    "connections not accepted from ip addresses on spamhaus xbl",
    "currently sending spam see: ",
    "domain does not exist:",
    "dynamic/zombied/spam ips blocked",
    "error: no valid recipients from ",
    "esmtp not accepting connections",
    "extreme bad ip profile",
    "go away",
    "helo command rejected:",
    "host network not allowed",
    "hosts with dynamic ip",
    "invalid ip for sending mail of domain",
    "is in a black list",
    "is not allowed to send mail from",
    "no access from mail server",
    "no matches to nameserver query",
    "not currently accepting mail from your ip",
    "part of their network is on our block list",
    "please use the smtp server of your isp",
    "refused - see http",
    "rejected - multi-blacklist",
    "rejected because the sending mta or the sender has not passed validation",
    "rejecting open proxy",
    "sender ip address rejected",
    "server access forbidden by your ip ",
    "service not available, closing transmission channel",
    "smtp error from remote mail server after initial connection:",
    "sorry, that domain isn't in my list of allowed rcpthosts",
    "sorry, your remotehost looks suspiciously like spammer",
    "temporarily deferred due to unexpected volume or user complaints",
    "to submit messages to this e-mail system has been rejected",
    "too many spams from your ip",
    "too many unwanted messages have been sent from the following ip address above",
    "was blocked by ",
    "we do not accept mail from dynamic ips",
    "you are not allowed to connect",
    "you are sending spam",
    "your ip address is listed in the rbl",
    "your network is temporary blacklisted",
    "your server requires confirmation",
    "because the ip is in spamhaus's list",
    "access denied, banned sender",  # Microsoft
    "access denied, bad helo",  # Microsoft
    "using customer block list",  # Microsoft
    "an unusual rate of unsolicited mail",  # Google
)
_BLOCKED_PIECES = (
    ("(", "@", ":blocked)"),
    ("access from ip address ", " blocked"),
    ("client host ", " blocked using"),
    ("connections will not be accepted from ", " because the ip is in spamhaus's list"),
    ("dnsbl:rbl ", ">_is_blocked"),
    ("email blocked by ", ".barracudacentral.org"),
    ("email blocked by ", "spamhaus"),
    ("host ", " refused to talk to me: ", " blocked"),
    ("ip ", " is blocked by earthlink"),
    ("is in an ", "rbl on "),
    ("mail server at ", " is blocked"),
    ("mail from ", " refused:"),
    ("mail from ", " refused, see ", "orbs"),
    ("message from ", " rejected based on blacklist"),
    ("messages from ", " temporarily deferred due to user complaints"),
    ("server ip ", " listed as abusive"),
    ("sorry! your ip address", " is blocked by rbl"),
    ("the domain ", " is blacklisted"),
    ("the email ", " is blacklisted"),
    ("the ip", " is blacklisted"),
    ("veuillez essayer plus tard. service refused, please try later. ", "103"),
    ("veuillez essayer plus tard. service refused, please try later. ", "510"),
    ("your access ip", " has been rejected"),
    ("your sender's ip address is listed at ", ".abuseat.org"),
)

_VIRUSDETECTED = (
    "it has a potentially executable attachment",
    "the message was rejected because it contains prohibited virus or spam content",
    "this form of attachment has been used by recent viruses or other malware",
    "virus detected",
    "virus phishing/malicious_url detected",
    "your message was infected with a virus",
)

_POLICYVIOLATION = (
    "an illegal attachment on your message",
    "because the recipient is not accepting mail with ",
    "by non-member to a members-only list",
    "closed mailing list",
    "denied by policy",
    "email not accepted for policy reasons",
    "email rejected due to security policies",
    "header are not accepted",
    "header error",
    "local policy violation",
    "message bounced due to organizational settings",
    "message given low priority",
    "message not accepted for policy reasons",
    "message rejected due to local policy",
    "messages with multiple addresses",
    "rejected for policy reasons",
    "protocol violation",
    "the email address used to send your message is not subscribed to this group",
    "the message was rejected by organization policy",
    "this message was blocked because its content presents a potential",
    "we do not accept messages containing images or other attachments",
    "you're using a mass mailer",
    "not accepted for policy reasons",  # Yahoo
)
_POLICYVIOLATION_PIECES = (("you have exceeded the", "allowable number of posts without solving a captcha"),)

_SYSTEMERROR = (
    "aliasing/forwarding loop broken",
    "can't create user output file",
    "could not load drd for domain",
    "internal error reading data",
    "internal server error: operation now in progress",
    "interrupted system call",
    "it encountered an error while being processed",
    "it would create a mail loop",
    "local configuration error",
    "local error in processing",
    "loop was found in the mail exchanger",
    "loops back to myself",
    "mail system configuration error",
    "queue file write error",
    "recipient deferred because there is no mdb",
    "remote server is misconfigured",
    "server configuration error",
    "service currently unavailable",
    "system config error",
    "temporary local problem",
    "timeout waiting for input",
    "transaction failed ",
    "temporary system problem",  # Google
)
_SYSTEMERROR_PIECES = (("unable to connect ", "daemon"),)

_NETWORKERROR = (
    "could not connect and send the mail to",
    "dns records for the destination computer could not be found",
    "hop count exceeded - possible mail loop",
    "host is unreachable",
    "host name lookup failure",
    "host not found, try again",
    "mail forwarding loop for ",
    "malformed name server reply",
    "malformed or unexpected name server reply",
    "maximum forwarding loop count exceeded",
    "message looping",
    "message probably in a routing loop",
    "no route to host",
    "too many hops",
    "unable to resolve route ",
    "unrouteable mail domain",
    "message exceeded 50 hops",  # Google
    "routing loop detected",  # Microsoft
    "dns query failed",  # Microsoft
)

_SYSTEMFULL = ("mail system full", "requested mail action aborted: exceeded storage allocation")

_NOTACCEPT = (
    "does not accept mail (nullmx)",
    "does not accept mail (null mx)",
    "host/domain does not accept mail",
    "host does not accept mail",
    "mail receiving disabled",
    "name server: .: host not found",
    "no mx record found for domain=",
    "no route for current request",
    "smtp protocol returned a permanent error",
    "system not accepting network messages",  # Microsoft
)

_EXPIRED = (
    "connection timed out",
    "could not find a gateway for",
    "delivery attempts will continue to be",
    "delivery expired",
    "delivery time expired",
    "failed to deliver to domain ",
    "giving up on",
    "have been failing for a long time",
    "has been delayed",
    "it has not been collected after",
    "message expired after sitting in queue for",
    "message expired, cannot connect to remote server",
    "message expired, connection refulsed",
    "message timed out",
    "retry time not reached for any host after a long failure period",
    "server did not respond",
    "this message has been in the queue too long",
    "unable to deliver message after multiple retries",
    "was not reachable within the allowed queue period",
    "your message could not be delivered for more than",
    "queue expired; message expired",  # Microsoft
    "retry timeout exceeded",  # Exim
)
_EXPIRED_PIECES = (("could not be delivered for", " days"),)

_FAILEDSTARTTLS = (
    "starttls is required to send mail",
    "tls required but not supported",
    "must issue a starttls command first",  # Google
    "failed mta-sts validation",  # Microsoft
    "starttls-not-supported",  # Microsoft
    "certificate-expired: destination mail server's certificate is expired",  # Microsoft
    "tlsa-invalid",  # Microsoft
    "dnssec-invalid",  # Microsoft
    "certificate-host-mismatch",  # Microsoft
)

_SECURITYERROR = (
    "account not subscribed to ses",
    "authentication credentials invalid",
    "authentication failure",
    "authentication required",
    "authentication turned on in your email client",
    "executable files are not allowed in compressed files",
    "insecure mail relay",
    "recipient address rejected: access denied",
    "sorry, you don't authenticate or the domain isn't in my list of allowed rcpthosts",
    "unauthenticated senders not allowed",
    "verification failure",
    "you are not authorized to send mail, authentication is required",
    "username and password not accepted",  # Google
    "application-specific password required",  # Google
)
_SECURITYERROR_PIECES = (
    ("authentication failed; server ", " said: "),
    ("authentification invalide", "305"),
    ("authentification requise", "402"),
    ("domain ", " is a dead domain"),
    ("user ", " is not authorized to perform ses:sendrawemail on resource"),
)

_MAILERERROR = (
    " || exit ",
    "procmail: ",
    "bin/procmail",
    "bin/maidrop",
    "command failed: ",
    "command died with status ",
    "command output:",
    "mailer error",
    "pipe to |/",
    "x-unix; ",
)

_VACATION = ("i am away on vacation", "i am away until", "i am out of the office", "i will be traveling for work on")

# -- the table ------------------------------------------------------------------------------------

RULES: Final[tuple[Rule, ...]] = (
    # Relay's own replies (relay/transport.py, relay/mx.py, relay/delivery.py): exact texts first,
    # since Relay's enhanced codes are its best guess, not a server's word.
    Rule("systemerror", ("relay is shutting down", "relay failed during the attempt"), group="relay"),
    Rule(
        "systemerror",
        ("could not read the message from the store", "message body missing from the store"),
        group="relay",
    ),
    Rule("systemerror", ("delivery attempt gave up after",), group="relay"),
    Rule("failedstarttls", ("but the server did not offer starttls",), group="relay"),
    Rule("failedstarttls", (), (("tls with ", " failed: "),), group="relay"),
    Rule("securityerror", ("refusing to send credentials without tls", "refused our credentials"), group="relay"),
    Rule("networkerror", ("no usable address for ", "no address for the mail exchangers of "), group="relay"),
    Rule(
        "networkerror",
        ("sent a malformed reply", "dropped the connection"),
        (
            ("connection to ", " timed out"),
            ("connection to ", " failed: "),
            ("dns lookup of ", " failed"),
            ("route host ", " has no address"),
        ),
        group="relay",
    ),
    Rule("networkerror", (), (("dns lookup of ", " timed out"),), group="relay"),
    Rule("hostunknown", ("has no mx and no address records", "bad domain name: "), group="relay"),
    # Provider and MTA specific texts (sisimai's rhost and lhost modules): distinctive enough to
    # trust whoever relays them, so they come before the generic lists.
    Rule(
        "userunknown",
        (
            "resolver.adr.recipientnotfound",
            "resolver.adr.exrecipnotfound",
            "the email account that you tried to reach does not exist",
            "dd this user doesn't have a ",
            "not listed in domino directory",
            "not listed in public name & address book",
        ),
        group="provider",
    ),
    Rule("rejected", ("temporarily deferred due to unexpected volume or user complaints",), group="yahoo"),
    Rule("expired", ("message expired",), only_statuses=("4.4.7", "5.4.300", "5.4.316"), group="microsoft"),
    Rule("blocked", ("access denied, please try again later",), only_statuses=("4.7.",), group="microsoft"),
    Rule("systemerror", ("server busy. please try again later from ",), group="microsoft"),
    Rule("blocked", ("try again later, closing connection.",), only_statuses=("4.7.0",), group="google"),
    Rule("expired", ("the recipient server did not accept our requests to connect",), group="google"),
    Rule("expired", ("dns error: could not contact dns servers",), group="google"),
    Rule(
        "hostunknown",
        ("dns error: domain name not found", "dns error: dns server returned answer with no data"),
        group="google",
    ),
    # Gmail's "(state N)": the SMTP state the other server refused in.
    Rule(
        "failedstarttls",
        (),
        (("google tried to deliver", " (state 6)"), ("google tried to deliver", " (state 9)")),
        status_silent=True,
        group="google",
    ),
    Rule("systemerror", (), (("google tried to deliver", " (state 8)"),), status_silent=True, group="google"),
    Rule("norelaying", (), (("google tried to deliver", " (state 12)"),), status_silent=True, group="google"),
    Rule("blocked", (), (("google tried to deliver", " (state 13)"),), status_silent=True, group="google"),
    Rule("userunknown", (), (("google tried to deliver", " (state 14)"),), status_silent=True, group="google"),
    Rule(
        "filtered",
        (),
        (
            ("google tried to deliver", " (state 15)"),
            ("google tried to deliver", " (state 17)"),
            ("google tried to deliver", " (state 18)"),
        ),
        status_silent=True,
        group="google",
    ),
    # qmail wraps the reason in "I'm not going to try again; this message has been in the queue
    # too long", which must not read as expired.
    Rule(
        "networkerror",
        ("sorry, i wasn't able to establish an smtp connection", "although i'm listed as a best-preference mx or a"),
        group="qmail",
    ),
    Rule("notaccept", ("sorry, i couldn't find a mail exchanger or ip address",), group="qmail"),
    Rule("hostunknown", ("sorry, i couldn't find any host ",), group="qmail"),
    Rule("systemerror", ("unable to contact ldap server", "bad interpreter: no such file or directory"), group="qmail"),
    Rule("blocked", ("but my name was rejected",), group="qmail"),
    # A local delivery program failed (a DSN's Diagnostic-Type X-Unix): sisimai says mailererror
    # before any SMTP reason, and these texts are the program's own.
    Rule("mailererror", _MAILERERROR),
    # sisimai's first pass, in its order. A status alone decides only where the text is silent.
    Rule("mailboxfull", _MAILBOXFULL, statuses=("4.2.2", "5.2.2")),
    Rule("emailtoolarge", _EMAILTOOLARGE, statuses=("4.2.3", "5.2.3", "5.3.4", "4.7.16", "5.7.16")),
    Rule("suspend", _SUSPEND, statuses=("5.7.13",), codes=frozenset({525})),
    Rule("hasmoved", _HASMOVED),
    Rule("norelaying", _NORELAYING, not_commands=frozenset({"CONN", "EHLO", "HELO"})),
    Rule(
        "authfailure",
        _AUTHFAILURE,
        _AUTHFAILURE_PIECES,
        statuses=("4.7.24", "4.7.26", "5.7.20", "5.7.21", "5.7.22", "5.7.23", "5.7.24", "5.7.26", "5.7.29", "5.7.509"),
    ),
    Rule(
        "userunknown",
        _USERUNKNOWN,
        _USERUNKNOWN_PIECES,
        statuses=("5.1.0", "5.1.1", "5.1.3"),
        unless=("norelaying", "blocked", "mailboxfull", "hasmoved", "rejected", "notaccept"),
        only_commands=frozenset({"RCPT"}),
    ),
    # "User unknown" where the command is unknown or DATA: a filter speaking (sisimai's rule).
    Rule("filtered", _USERUNKNOWN + _FILTERED, _USERUNKNOWN_PIECES, not_commands=_EARLY_COMMANDS),
    Rule("requireptr", _REQUIREPTR, _REQUIREPTR_PIECES, statuses=("4.7.25", "5.7.25")),
    Rule("notcompliantrfc", _NOTCOMPLIANTRFC, _NOTCOMPLIANTRFC_PIECES),
    Rule("badreputation", _BADREPUTATION),
    Rule("contenterror", _CONTENTERROR),
    Rule("rejected", _REJECTED, statuses=("4.1.7", "4.1.8", "5.1.7", "5.1.8"), sender_side=True),
    Rule("hostunknown", _HOSTUNKNOWN, _HOSTUNKNOWN_PIECES, statuses=("5.1.2", "5.4.4"), unless=("networkerror",)),
    Rule("spamdetected", _SPAMDETECTED, _SPAMDETECTED_PIECES, statuses=("5.7.28",), not_commands=_EARLY_COMMANDS),
    Rule("ratelimited", _RATELIMITED, statuses=("5.5.3",)),
    Rule("blocked", _BLOCKED, _BLOCKED_PIECES, statuses=("4.7.1", "4.7.2", "4.2.1")),
    # sisimai's second pass: text only.
    Rule("virusdetected", _VIRUSDETECTED, not_commands=_EARLY_COMMANDS),
    Rule("policyviolation", _POLICYVIOLATION, _POLICYVIOLATION_PIECES),
    Rule("systemerror", _SYSTEMERROR, _SYSTEMERROR_PIECES),
    Rule("networkerror", _NETWORKERROR),
    Rule("systemfull", _SYSTEMFULL),
    Rule("notaccept", _NOTACCEPT),
    Rule("expired", _EXPIRED, _EXPIRED_PIECES),
    Rule(
        "failedstarttls",
        _FAILEDSTARTTLS,
        statuses=("5.7.10", "5.7.30", "4.7.10", "4.7.30"),
        codes=frozenset({523, 524, 538}),
    ),
    Rule("securityerror", _SECURITYERROR, _SECURITYERROR_PIECES),
    Rule("vacation", _VACATION),
)

# Enhanced status code -> reason (sisimai's table, with its newer names). x.0.0 says nothing.
STATUS: Final[dict[str, str]] = {
    "4.1.6": "hasmoved",
    "4.1.7": "rejected",
    "4.1.8": "rejected",
    "4.1.9": "systemerror",
    "4.2.1": "blocked",
    "4.2.2": "mailboxfull",
    "4.2.3": "emailtoolarge",
    "4.2.4": "filtered",
    "4.3.1": "systemfull",
    "4.3.2": "notaccept",
    "4.3.3": "systemerror",
    "4.3.5": "systemerror",
    "4.4.1": "expired",
    "4.4.2": "networkerror",
    "4.4.3": "systemerror",
    "4.4.4": "networkerror",
    "4.4.5": "systemfull",
    "4.4.6": "networkerror",
    "4.4.7": "expired",
    "4.4.8": "networkerror",
    "4.5.3": "systemerror",
    "4.5.5": "systemerror",
    "4.6.0": "contenterror",
    "4.6.2": "contenterror",
    "4.6.5": "contenterror",
    "4.7.1": "blocked",
    "4.7.2": "blocked",
    "4.7.5": "securityerror",
    "4.7.6": "securityerror",
    "4.7.7": "securityerror",
    "4.7.12": "securityerror",
    "4.7.15": "securityerror",
    "4.7.16": "emailtoolarge",
    "4.7.24": "authfailure",
    "4.7.25": "requireptr",
    "4.7.26": "authfailure",
    "5.1.0": "userunknown",
    "5.1.1": "userunknown",
    "5.1.2": "hostunknown",
    "5.1.3": "userunknown",
    "5.1.4": "filtered",
    "5.1.6": "hasmoved",
    "5.1.7": "rejected",
    "5.1.8": "rejected",
    "5.1.9": "systemerror",
    "5.1.10": "notaccept",
    "5.2.0": "filtered",
    "5.2.1": "filtered",
    "5.2.2": "mailboxfull",
    "5.2.3": "emailtoolarge",
    "5.2.4": "filtered",
    "5.3.0": "systemerror",
    "5.3.1": "systemfull",
    "5.3.2": "notaccept",
    "5.3.3": "systemerror",
    "5.3.4": "emailtoolarge",
    "5.3.5": "systemerror",
    "5.4.0": "networkerror",
    "5.4.3": "systemerror",
    "5.4.4": "hostunknown",
    "5.4.6": "networkerror",
    "5.5.2": "syntaxerror",
    "5.5.3": "ratelimited",
    "5.5.4": "systemerror",
    "5.5.5": "systemerror",
    "5.5.6": "syntaxerror",
    "5.6.0": "contenterror",
    "5.6.1": "contenterror",
    "5.6.2": "contenterror",
    "5.6.3": "contenterror",
    "5.6.5": "contenterror",
    "5.6.6": "contenterror",
    "5.6.7": "contenterror",
    "5.6.8": "contenterror",
    "5.6.9": "contenterror",
    "5.7.0": "securityerror",
    "5.7.1": "securityerror",
    "5.7.2": "securityerror",
    "5.7.3": "securityerror",
    "5.7.4": "securityerror",
    "5.7.5": "securityerror",
    "5.7.6": "securityerror",
    "5.7.7": "securityerror",
    "5.7.8": "securityerror",
    "5.7.9": "securityerror",
    "5.7.10": "failedstarttls",
    "5.7.11": "securityerror",
    "5.7.13": "suspend",
    "5.7.14": "securityerror",
    "5.7.15": "securityerror",
    "5.7.16": "emailtoolarge",
    "5.7.17": "hasmoved",
    "5.7.18": "hasmoved",
    "5.7.19": "securityerror",
    "5.7.20": "authfailure",
    "5.7.21": "authfailure",
    "5.7.22": "authfailure",
    "5.7.23": "authfailure",
    "5.7.24": "authfailure",
    "5.7.25": "requireptr",
    "5.7.26": "authfailure",
    "5.7.27": "notaccept",
    "5.7.28": "spamdetected",
    "5.7.29": "authfailure",
    "5.7.30": "failedstarttls",
}

# Rule numbers per reason, for vetoes (Relay's own rules never veto a server's words).
_BY_REASON: Final[dict[str, tuple[int, ...]]] = {
    reason: tuple(i for i, r in enumerate(RULES) if r.reason == reason and r.group != "relay") for reason in REASONS
}

# Every phrase indexed by one of its 4-grams: the text's own 4-grams pick the few phrases worth
# searching for, instead of ~1000 substring searches per call.
_KEY: Final = 4


# An index entry: rule number, the trigger's place in the rule (phrases first, then pieces),
# the trigger text.
_Entry = tuple[int, int, str]


def _build_index() -> tuple[dict[str, tuple[_Entry, ...]], tuple[_Entry, ...]]:
    # Ordered pieces are indexed by their longest piece; each phrase by its rarest 4-gram, so a
    # common one ("the ", "mess") does not send every text to dozens of phrases.
    triggers = [
        (number, place, phrase)
        for number, rule in enumerate(RULES)
        for place, phrase in enumerate(rule.phrases + tuple(max(pieces, key=len) for pieces in rule.pieces))
    ]
    counts: dict[str, int] = {}
    for _, _, phrase in triggers:
        for gram in {phrase[at : at + _KEY] for at in range(len(phrase) - _KEY + 1)}:
            counts[gram] = counts.get(gram, 0) + 1
    index: dict[str, list[_Entry]] = {}
    short: list[_Entry] = []
    for entry in triggers:
        phrase = entry[2]
        if len(phrase) < _KEY:
            short.append(entry)
            continue
        rarest = min((phrase[at : at + _KEY] for at in range(len(phrase) - _KEY + 1)), key=counts.__getitem__)
        index.setdefault(rarest, []).append(entry)
    return {k: tuple(v) for k, v in index.items()}, tuple(short)


_INDEX, _SHORT = _build_index()
_KEYS: Final = frozenset(_INDEX)


def _scan(low: str) -> dict[int, str]:
    """Rule number -> the first (in the rule's order) of its phrases or pieces found in the text."""
    grams = {low[at : at + _KEY] for at in range(len(low) - _KEY + 1)}
    best: dict[int, tuple[int, str]] = {}
    for entries in [_INDEX[key] for key in _KEYS.intersection(grams)] + [_SHORT]:
        for number, place, trigger in entries:
            if trigger not in low or (number in best and best[number][0] <= place):
                continue
            rule = RULES[number]
            if place < len(rule.phrases):
                best[number] = (place, trigger)
            else:
                pieces = rule.pieces[place - len(rule.phrases)]
                if _in_order(low, pieces):
                    best[number] = (place, "...".join(pieces))
    return {number: found for number, (_, found) in best.items()}


def _in_order(low: str, pieces: tuple[str, ...]) -> bool:
    at = 0
    for piece in pieces:
        at = low.find(piece, at)
        if at < 0:
            return False
        at += len(piece)
    return True


def _by(key: str) -> dict[object, tuple[int, ...]]:
    table: dict[object, list[int]] = {}
    for number, rule in enumerate(RULES):
        for value in getattr(rule, key):
            table.setdefault(value, []).append(number)
    return {k: tuple(v) for k, v in table.items()}


# Rules a status (exact) or a reply code can decide without text.
_BY_STATUS: Final = _by("statuses")
_BY_CODE: Final = _by("codes")


_LEAD = re.compile(r"\s*(?:[a-z][a-z0-9-]{0,20}\s*;\s*)?([245]\d\d)(?:[ -]+([245]\.\d{1,3}\.\d{1,3}))?(?![\d.])")
_PAIR = re.compile(r"(?<!\d)([245]\d\d)[ -]([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
_ENHANCED = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
_ENHANCED_EXACT = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_COMMAND = re.compile(
    r"(?:in reply to|after|most progress was) (rcpt to|mail from|end of data|data|helo|ehlo|starttls)"
    r"|does not like (recipient|sender)|\[(rcpt_to|mail_from)\]"
)
_COMMANDS: Final = {
    "rcpt to": "RCPT",
    "mail from": "MAIL",
    "end of data": "DATA",
    "data": "DATA",
    "helo": "HELO",
    "ehlo": "EHLO",
    "starttls": "STARTTLS",
    "recipient": "RCPT",  # qmail: "does not like recipient"
    "sender": "MAIL",
    "rcpt_to": "RCPT",
    "mail_from": "MAIL",
}


def classify(code: int | None, enhanced: str | None, text: str, *, command: str | None = None) -> Classification:
    """The reason for one failed recipient, from the reply code, enhanced code and reply text.

    ``code`` None: no server answered (Relay's own reply, or a DSN without a Diagnostic-Code).
    The text may start with the codes ("550 5.1.1 ..."); they are taken from it when not given.
    ``command`` is the SMTP command answered ("MAIL", "RCPT", "DATA"), where known.
    """
    try:
        return _classify(code, enhanced, text, command)
    except Exception:  # a classifier bug must never cost a delivery; say so in the rule instead
        log.exception("bounce classifier failed on code %r, enhanced %r", code, enhanced)
        return Classification("undefined", False, "classifier error")


def expired(text: str = "") -> Classification:
    """Relay gave up: the message outlived its maximum age in the queue."""
    return Classification("expired", False, f"max_age: {text}" if text else "max_age")


@dataclass(frozen=True, slots=True)
class _Reply:
    """One failure, normalised: what the rules look at."""

    code: int | None
    enhanced: str | None
    low: str  # lower-cased, whitespace collapsed, capped
    command: str | None
    hits: dict[int, str]  # rule number -> its text found in ``low``


def _classify(code: object, enhanced: object, text: object, command: object) -> Classification:
    reply = _normalise(code, enhanced, text, command)
    # Only rules the text, the status or the code mention can match; walk those in table order.
    candidates = set(reply.hits)
    candidates.update(_BY_STATUS.get(reply.enhanced, ()))
    candidates.update(_BY_CODE.get(reply.code, ()))
    for number in sorted(candidates):
        found = _match(RULES[number], number, reply)
        if found is not None:
            return _result(RULES[number].reason, reply, found)
    reason, rule = _fallback(reply)
    return _result(reason, reply, rule)


def _normalise(code: object, enhanced: object, text: object, command: object) -> _Reply:
    number = code if isinstance(code, int) and not isinstance(code, bool) and 200 <= code <= 599 else None
    status = enhanced.strip() if isinstance(enhanced, str) else None
    if status is not None and not _ENHANCED_EXACT.fullmatch(status):
        status = None
    low = " ".join(text[:_MAX_TEXT].lower().split()) if isinstance(text, str) else ""
    if number is None or status is None:
        number, status = _codes_from_text(low, number, status)
    verb = command.upper() if isinstance(command, str) and command else None
    if verb is None and low:
        m = _COMMAND.search(low)
        if m:
            verb = _COMMANDS[m.group(m.lastindex or 1)]
    return _Reply(number, status, low, verb, _scan(low) if low else {})


def _fallback(reply: _Reply) -> tuple[str, str]:
    """No rule matched: the status table, then what the code's classes and the command say."""
    code, enhanced = reply.code, reply.enhanced
    if enhanced is not None:
        reason = STATUS.get(enhanced) or {"6.": "contenterror", "7.": "securityerror"}.get(enhanced[2:4], "")
        if reason:
            return reason, f"status {enhanced}"
    if reply.command in ("EHLO", "HELO"):  # refused before any address was given: the client
        return "blocked", f"refused at {reply.command}"
    if code is not None and (401 <= code <= 407 or 501 <= code <= 507):
        return "syntaxerror", f"code {code}"
    if code in (521, 556):  # RFC 7504: this host, or this domain, accepts no mail
        return "notaccept", f"code {code}"
    if reply.low:
        return "onhold", "no rule matched"
    return "undefined", "no code and no text"


def _match(rule: Rule, number: int, reply: _Reply) -> str | None:
    phrase = reply.hits.get(number)
    if phrase is not None and _text_counts(rule, reply.enhanced, reply.command):
        if rule.reason == "rejected" and any(p in reply.low for p in _REJECTED_NOT):
            return None
        return f'{rule.reason}: "{phrase}"'
    status = reply.enhanced if reply.enhanced in rule.statuses else None
    if status is None and reply.code not in rule.codes:
        return None
    for other in rule.unless:  # the text outranks the code
        if any(veto in reply.hits for veto in _BY_REASON[other]):
            return None
    return f"status {status}" if status is not None else f"code {reply.code}"


def _text_counts(rule: Rule, enhanced: str | None, command: str | None) -> bool:
    if command in rule.not_commands or (rule.only_commands and command not in rule.only_commands):
        return False
    if rule.only_statuses and _status_in(enhanced, rule.only_statuses) is None:
        return False
    if rule.status_silent and enhanced in STATUS and ".0" not in enhanced:
        return False
    if rule.sender_side and command != "MAIL":
        named = STATUS.get(enhanced or "", "")
        if command == "DATA":
            return named != "userunknown"
        return named in ("", "securityerror", "systemerror")
    return True


def _codes_from_text(low: str, code: int | None, enhanced: str | None) -> tuple[int | None, str | None]:
    m = _LEAD.match(low)
    if m is None or m.group(2) is None:
        m = _PAIR.search(low) or m
    if m is not None:
        if code is None:
            code = int(m.group(1))
        if enhanced is None and m.group(2):
            enhanced = m.group(2)
    if enhanced is None:
        e = _ENHANCED.search(low)
        if e is not None and (code is None or e.group(1)[0] == str(code)[0]):
            enhanced = e.group(1)
    return code, enhanced


def _result(reason: str, reply: _Reply, rule: str) -> Classification:
    hard = reason in _HARD
    if reason == "notaccept":  # hard unless a code says it is temporary (sisimai's rule)
        hard = (reply.code or 0) // 100 != 4 and not (reply.enhanced or "").startswith("4")
    return Classification(reason, hard, rule)
