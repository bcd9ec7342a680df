/*
 * What GLib's key-file parser makes of a tlshd configuration file: the calls ktls-utils'
 * src/tlshd/config.c (and client.c/server.c) make, for every key it reads, so that
 * tests/unit/test_config_glib.py can compare tlshd.config with the real parser.
 *
 * Output, one line per key:
 *   int GROUP KEY VALUE            g_key_file_get_integer(), 0 on error, as ktls-utils uses it
 *   str GROUP KEY =HEX|-           g_key_file_get_string(): '=' and the bytes in hex, '-' for NULL
 *   list GROUP KEY =HEX,=HEX,...|-  g_key_file_get_string_list()
 * or a single line "load-error MESSAGE" when g_key_file_load_from_file() fails.
 */
#include <glib.h>
#include <stdio.h>
#include <string.h>

static void hex(const char *s)
{
	for (; *s; s++)
		printf("%02x", (unsigned char)*s);
}

static void print_int(GKeyFile *kf, const char *group, const char *key)
{
	printf("int %s %s %d\n", group, key, g_key_file_get_integer(kf, group, key, NULL));
}

static void print_str(GKeyFile *kf, const char *group, const char *key)
{
	gchar *value = g_key_file_get_string(kf, group, key, NULL);

	printf("str %s %s ", group, key);
	if (value) {
		printf("=");
		hex(value);
	} else {
		printf("-");
	}
	printf("\n");
	g_free(value);
}

static void print_list(GKeyFile *kf, const char *group, const char *key)
{
	gsize length = 0, i;
	gchar **items = g_key_file_get_string_list(kf, group, key, &length, NULL);

	printf("list %s %s ", group, key);
	if (!items) {
		printf("-\n");
		return;
	}
	for (i = 0; i < length; i++) {
		if (i)
			printf(",");
		printf("=");
		hex(items[i]);
	}
	printf("\n");
	g_strfreev(items);
}

int main(int argc, char **argv)
{
	static const char *const sides[] = { "authenticate.client", "authenticate.server" };
	static const char *const paths[] = { "x509.truststore", "x509.crl", "x509.certificate",
					     "x509.private_key", "x509.pq.certificate",
					     "x509.pq.private_key" };
	static const char *const ints[] = { "loglevel", "tls", "nl", "delay_done" };
	GKeyFile *kf;
	GError *error = NULL;
	size_t i, j;

	if (argc != 2) {
		fprintf(stderr, "usage: %s FILE\n", argv[0]);
		return 2;
	}
	kf = g_key_file_new();
	if (!g_key_file_load_from_file(kf, argv[1], G_KEY_FILE_KEEP_COMMENTS, &error)) {
		printf("load-error %s\n", error->message);
		return 0;
	}
	for (i = 0; i < G_N_ELEMENTS(ints); i++)
		print_int(kf, "debug", ints[i]);
	print_list(kf, "authenticate", "keyrings");
	for (i = 0; i < G_N_ELEMENTS(sides); i++)
		for (j = 0; j < G_N_ELEMENTS(paths); j++)
			print_str(kf, sides[i], paths[j]);
	g_key_file_free(kf);
	return 0;
}
